"""The Kubernetes side of the agent: pod identity, pod annotations, container and rollout restarts."""
