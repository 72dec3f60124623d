"""The Ray Serve application: encoder and decoder deployments, ingress, metrics."""
