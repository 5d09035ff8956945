"""Meshes, logical-axis rules and collective algorithms for data, fsdp, tensor, sequence and expert
parallelism. Imports only jax and kernels_pallas (see DESIGN.md)."""
