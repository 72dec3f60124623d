"""The microscope side: wire protocol, ZeroMQ listener and sender, adapters, simulator, label sinks."""
