"""RAG chat with LlamaIndex: PEGHybridRetriever in a CondensePlusContextChatEngine.

    python examples/llama_index_chat.py                   # the bundled sample KB, interactive
    python examples/llama_index_chat.py docs/ -q "问题"     # one question over your own files
    python examples/llama_index_chat.py --reranker BAAI/bge-reranker-base   # a rerank stage

Follow-up questions are condensed with the chat history before retrieval; a node
postprocessor numbers the retrieved passages so the streamed answer can cite them as [n].
With --reranker, PEGRerank comes first among the node postprocessors: it keeps the k best
of a wider first-stage list.
The LLM: any OpenAI-compatible server named by $PEG_RAG_LLM_MODEL / _BASE_URL / _API_KEY
(pip install "peg-rag[llm]"; see peg_rag/rag_chat.py); unset, answers are extractive.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llama_index.core import Document
from llama_index.core.chat_engine import CondensePlusContextChatEngine
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from peg_rag.apps.rag_chat import (
    NO_LLM_NOTICE,
    SYSTEM_PROMPT,
    LLMSettings,
    Source,
    chat_arguments,
    chunk_size_for,
    citation_lines,
    extractive_answer,
    llm_from_env,
    load_chat_encoder,
    load_chat_reranker,
    read_inputs,
    typed_questions,
)
from peg_rag.integrations.llama_index import PEGHybridRetriever, PEGRerank

CONTEXT_PROMPT = SYSTEM_PROMPT + "\n\n参考资料：\n{context_str}"


class NumberSources(BaseNodePostprocessor):
    """Label each retrieved node "[n]" in the context, so the LLM can cite it."""

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        for n, hit in enumerate(nodes, start=1):
            hit.node.metadata["引用"] = f"[{n}]"
        return nodes


def openai_like(settings: LLMSettings):
    from llama_index.llms.openai_like import OpenAILike

    return OpenAILike(
        model=settings.model,
        api_base=settings.base_url or "https://api.openai.com/v1",
        api_key=settings.api_key,
        is_chat_model=True,
        context_window=8192,
        timeout=120,
    )


def sources_of(hits: Sequence[NodeWithScore]) -> list[Source]:
    return [
        Source(
            h.node.node_id, h.node.get_content(), h.score or 0.0, h.node.metadata.get("title", "")
        )
        for h in hits
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = chat_arguments(__doc__.splitlines()[0]).parse_args(argv)
    encoder = load_chat_encoder(args.model)
    reranker = load_chat_reranker(args.reranker)
    documents = [
        Document(id_=d.id, text=d.text, metadata=d.metadata) for d in read_inputs(args.paths)
    ]
    retriever = PEGHybridRetriever.from_documents(
        documents,
        encoder,
        index_dir=args.index_dir,
        show_progress=True,
        similarity_top_k=args.k,
        chunk_size=chunk_size_for(encoder, args.chunk_size),
    )
    postprocessors: list[BaseNodePostprocessor] = [NumberSources()]
    if reranker is not None:
        # The cross-encoder is worth its cost on a wider list than the k passages kept.
        retriever.similarity_top_k = max(args.k, retriever.hybrid.settings.rerank_top_n)
        postprocessors.insert(0, PEGRerank(reranker=reranker, top_n=args.k))
    llm = llm_from_env(openai_like, "llm")
    engine = None
    if llm is not None:
        engine = CondensePlusContextChatEngine.from_defaults(
            retriever, llm=llm, context_prompt=CONTEXT_PROMPT, node_postprocessors=postprocessors
        )
    print(f"{len(documents)} documents indexed; LLM: {llm.model if llm else 'none'}")
    for question in typed_questions(args.question):
        if engine is not None:
            response = engine.stream_chat(question)
            for token in response.response_gen:  # the answer as it is generated
                print(token, end="", flush=True)
            print()
            hits = response.source_nodes
        else:
            print(NO_LLM_NOTICE)
            hits = retriever.retrieve(question)
            for postprocessor in postprocessors:
                hits = postprocessor.postprocess_nodes(hits, query_str=question)
            print(extractive_answer(sources_of(hits)))
        print("Sources:\n" + "\n".join(citation_lines(sources_of(hits))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
