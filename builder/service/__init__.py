"""The installer service: HTTP app, issuing logic, Redis workers."""
