"""Silence the start-up noise of TensorFlow, absl and gym, which Trax imports.

TensorFlow's C++ runtime writes CUDA probing messages straight to file descriptor 2 and gym prints an
"unmaintained" notice on import; in Jupyter both land in the learner's first cell. Rather than import
TensorFlow eagerly (seconds of start-up for code that never needs it), `install()` puts an import hook in
front of `sys.meta_path` that mutes stderr only while those noisy packages are first loaded.

The same hook repairs one side effect: Trax's `jaxboard` switches matplotlib to its non-display Agg backend on
import, after which Jupyter silently shows no plots. Once it has loaded, the backend Jupyter chose is restored.
`import trax` itself is made lean (`labkit.lean_trax`: Trax's submodules load on first use, not all at once, which
halves its import time). And once `trax.layers` has loaded, labkit's Trax shims are installed (`labkit.compat.install_trax_shims`: `tie_in`
and the `fastmath.cond` form predict mode needs), so they hold without importing Trax eagerly.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import io
import logging
import os
import sys
import warnings

from labkit import lean_trax

_NOISY_PACKAGES = frozenset({"tensorflow", "gym", "tensorflow_text", "tensorflow_datasets"})
_BACKEND_SWITCHERS = frozenset({"trax.jaxboard"})
_NEEDS_SHIMS = frozenset({"trax.layers"})


@contextlib.contextmanager
def muted_stderr():
    """Send both Python's `sys.stderr` and the process's file descriptor 2 to nowhere."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull)


@contextlib.contextmanager
def kept_matplotlib_backend():
    """Undo a module's `matplotlib.use(...)`: restore the backend Jupyter asked for in MPLBACKEND."""
    yield
    chosen = os.environ.get("MPLBACKEND")
    if not chosen or "matplotlib" not in sys.modules:
        return
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    if shell is not None and chosen.endswith("backend_inline"):
        # The magic also re-registers the PNG display hook that a bare matplotlib.use() would skip.
        shell.run_line_magic("matplotlib", "inline")
    else:
        sys.modules["matplotlib"].use(chosen)


@contextlib.contextmanager
def shims_installed_after():
    """Install labkit's Trax shims once the module being loaded has finished loading."""
    yield
    from labkit import compat

    compat.install_trax_shims()


class _WrappedLoader(importlib.abc.Loader):
    """Runs the real loader inside a context manager (muted stderr, kept backend)."""

    def __init__(self, inner: importlib.abc.Loader, context):
        self._inner, self._context = inner, context

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        with self._context():
            self._inner.exec_module(module)


class _ImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "trax":
            return self._real_spec(name, lean_trax.LeanLoader)
        context = (muted_stderr if name in _NOISY_PACKAGES else
                   kept_matplotlib_backend if name in _BACKEND_SWITCHERS else
                   shims_installed_after if name in _NEEDS_SHIMS else None)
        if context is None:
            return None
        return self._real_spec(name, lambda loader: _WrappedLoader(loader, context))

    def _real_spec(self, name, wrap):
        """The spec the normal finders give `name`, its loader wrapped by `wrap`."""
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = wrap(spec.loader)
        return spec


def install() -> None:
    """Mute start-up noise once per process; safe to call again."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "hide")
    for module in ("tensorflow", "gym", "trax", "tensorflow_datasets", "jax._src.xla_bridge"):
        warnings.filterwarnings("ignore", module=module)
    # tqdm.auto falls back to a text bar without ipywidgets; its warning about that is noise here.
    warnings.filterwarnings("ignore", message="IProgress not found")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # e.g. "Assets written to" on every SavedModel export
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    if not any(isinstance(f, _ImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook())
