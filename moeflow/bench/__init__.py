"""Measurement: `moeflow info` (report.py), `moeflow bench` (cpu.py) and the peers it runs
beside moeflow (peers.py). Figures are always measured, never stored."""
