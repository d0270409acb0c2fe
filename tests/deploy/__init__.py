"""Offline validation of the deployment files: docker-compose.yml and the images, Kubernetes manifests, Slurm scripts."""
