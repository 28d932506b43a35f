"""Build hook for the one optional C extension; everything else is in pyproject.toml.

``agent._envelope`` (agent/_envelope.c) hashes and splices entity versions about three
times faster than the pure-Python builder it mirrors. It needs a C compiler, Python's
headers and OpenSSL's (Debian: gcc, python3-dev, libssl-dev). ``optional=True``: where
it cannot be built, the install goes on and the agent uses the pure-Python builder
(``edge-agent status`` and the startup log say which one runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "agent._envelope",
            sources=["agent/_envelope.c"],
            libraries=["crypto"],
            optional=True,
        )
    ]
)
