"""Where node reports go: store metadata (default), a status path, pod annotations."""
