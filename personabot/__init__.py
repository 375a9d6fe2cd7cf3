"""personabot: a persona of your choosing on an open LLM, live on Telegram, retrained and swapped without a restart.

The installed distribution is this one namespace: `personabot.core`, `.training`, `.workers`, `.bot`
and `.ui` are the project's top-level folders (mapped by setuptools' package-dir); this package
itself holds the entry points on top of them (the CLI, `up`, its supervisor and the embedded Redis).
"""

from pathlib import Path as _Path

# A source checkout that is not installed (the GPU box runs the benches with PYTHONPATH set to the
# checkout): the folders beside this one are the subpackages. An installed wheel has them inside.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "core" / "__init__.py").is_file():
    __path__.append(str(_checkout))
