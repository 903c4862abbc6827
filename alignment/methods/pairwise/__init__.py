"""Pairwise preference methods (DPO, CPO, SimPO, ORPO, SMPO): one packed forward, one trainer, a pure loss each."""
