#!/bin/sh
# Installs agent-sidecar and the embedded OPA engine into a new virtual environment at PREFIX.
# Run from the root of the build context: by the Dockerfile's build stage, and by
# tests/test_image.py into a fresh temporary prefix, so the tested steps are the image's steps.
#
#   sh deploy/image/install.sh /opt/agent-sidecar
#
# PYTHON picks the interpreter (default python3; the image's is Python 3.11).
set -eu
prefix=${1:?usage: install.sh PREFIX}
python=${PYTHON:-python3}

"$python" -m venv "$prefix"
# The package (not editable), with the policy schemas and the approver page as package data.
"$prefix/bin/python" -m pip install --quiet --disable-pip-version-check .
# The embedded OPA engine: its metadata asks for Python 3.14 although its ctypes wrapper runs
# on 3.11, hence --ignore-requires-python; --no-deps keeps pip from resolving for 3.14.
# Wheels exist for Linux x86_64 only: build the image for linux/amd64.
"$prefix/bin/python" -m pip install --quiet --disable-pip-version-check \
  --ignore-requires-python --no-deps opa-golib-python-bindings==0.4.4
# Nothing installs at run time: no pip, no setuptools in the final environment.
"$prefix/bin/python" -m pip uninstall --quiet --yes pip setuptools
# Bytecode compiled now: the container's root filesystem is read-only (deploy/k8s).
"$prefix/bin/python" -m compileall -q "$prefix/lib" >/dev/null
