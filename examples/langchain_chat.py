"""RAG chat with LangChain: PEGHybridRetriever feeding a prompt | LLM | parser chain.

    python examples/langchain_chat.py                     # the bundled sample KB, interactive
    python examples/langchain_chat.py docs/ -q "问题"       # one question over your own files
    python examples/langchain_chat.py --reranker BAAI/bge-reranker-base     # a rerank stage

Each turn retrieves for the question, numbers the passages in the system prompt and
streams the chain's answer with [n] citations; earlier turns go in as chat history.
With --reranker, the retriever's own rerank stage reorders the fused top candidates (no
ContextualCompressionRetriever needed, which LangChain 1.x keeps in langchain-classic).
The LLM: any OpenAI-compatible server named by $PEG_RAG_LLM_MODEL / _BASE_URL / _API_KEY
(pip install "peg-rag[llm]"; see peg_rag/rag_chat.py); unset, answers are extractive.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from langchain_core.documents import Document
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

from peg_rag.apps.rag_chat import (
    NO_LLM_NOTICE,
    SYSTEM_PROMPT,
    LLMSettings,
    Source,
    chat_arguments,
    chunk_size_for,
    citation_lines,
    context_block,
    extractive_answer,
    llm_from_env,
    load_chat_encoder,
    load_chat_reranker,
    read_inputs,
    typed_questions,
)
from peg_rag.integrations.langchain import PEGHybridRetriever

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", SYSTEM_PROMPT + "\n\n参考资料：\n{context}"),
        MessagesPlaceholder("history"),
        ("human", "{question}"),
    ]
)


def chat_openai(settings: LLMSettings):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=settings.model,
        base_url=settings.base_url,
        api_key=settings.api_key,
        streaming=True,
        timeout=120,
    )


def sources_of(docs: Sequence[Document]) -> list[Source]:
    return [
        Source(d.id or "", d.page_content, d.metadata["score"], d.metadata.get("title", ""))
        for d in docs
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = chat_arguments(__doc__.splitlines()[0]).parse_args(argv)
    encoder = load_chat_encoder(args.model)
    reranker = load_chat_reranker(args.reranker)
    documents = read_inputs(args.paths)
    retriever = PEGHybridRetriever.from_texts(
        [d.text for d in documents],
        encoder,
        metadatas=[d.metadata for d in documents],
        ids=[d.id for d in documents],
        index_dir=args.index_dir,
        show_progress=True,
        k=args.k,
        reranker=reranker,
        chunk_size=chunk_size_for(encoder, args.chunk_size),
    )
    llm = llm_from_env(chat_openai, "llm")
    answer = PROMPT | llm | StrOutputParser() if llm is not None else None
    print(f"{len(documents)} documents indexed; LLM: {llm.model_name if llm else 'none'}")
    history: list[BaseMessage] = []
    for question in typed_questions(args.question):
        sources = sources_of(retriever.invoke(question))
        if answer is not None:
            inputs = {"context": context_block(sources), "history": history, "question": question}
            reply = ""
            for chunk in answer.stream(inputs):  # the answer as it is generated
                print(chunk, end="", flush=True)
                reply += chunk
            print()
            history += [HumanMessage(question), AIMessage(reply)]
        else:
            print(NO_LLM_NOTICE)
            print(extractive_answer(sources))
        print("Sources:\n" + "\n".join(citation_lines(sources)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
