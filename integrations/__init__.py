"""Integrations layer: LlamaIndex (``[llama-index]`` extra) and LangChain (``[langchain]``).

They use only public names of the core and retrieval layers (``peg_rag.core``,
``peg_rag.retrieval``), never the trainer, the apps or the CLI.
"""
