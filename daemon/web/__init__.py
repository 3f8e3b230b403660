"""The review page, the HTTP API and the Prometheus metrics, served by scanrestore itself:
security (who may do what), previews (8-bit sRGB for browsers), views (what is shown), metrics,
the application (routes and thin handlers) and the server (foreground or a child process)."""
