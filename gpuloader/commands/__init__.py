"""The ``gpuloader`` command line: verify, info, pack, demo."""
