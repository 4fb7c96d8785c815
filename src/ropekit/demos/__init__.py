"""The seed tutorial's lessons as runnable, checked demos (``ropekit demo ...``).

One module per demo (``permutation``, ``relative``, ``kv_cache``, ``extrapolation``), each with
``run(fast, plot_dir, ...) -> DemoResult``; the maths lives in small pure functions beside it.
"""
