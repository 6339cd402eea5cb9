"""vpnfleet: an OpenVPN service as a fleet of pods, steered by one control plane."""

__version__ = "0.1.0"
