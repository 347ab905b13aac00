"""appliance: an on-prem inference server for one GPU box."""

__version__ = "0.1.0"
