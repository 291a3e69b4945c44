"""Code every role shares: the wire protocol, transport, config, metrics and the launcher."""

__version__ = "0.1.0"
