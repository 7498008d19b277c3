"""What administrators see: the job log, metrics, devices, health and the web endpoints."""
