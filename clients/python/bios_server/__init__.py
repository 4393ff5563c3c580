"""Server-side plumbing shared by the render and train services (not needed by the client)."""
