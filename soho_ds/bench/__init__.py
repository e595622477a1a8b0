"""Compute planning (soho-plan): a measured throughput turned into steps, epochs and GPU-hours.
The benchmarks themselves live in benchmarks/ with their results."""
