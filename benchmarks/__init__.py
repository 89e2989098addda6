"""Side-by-side benchmarks of onnxslim_tool against the tools users would pick instead.

Run everything with ``python -m benchmarks.run``; see ``benchmarks/README.md``.
"""
