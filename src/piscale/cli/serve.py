"""``piscale serve``: the OpenAI-compatible server (see ``piscale.serve``)."""

from __future__ import annotations

from pathlib import Path

import typer

from piscale.cli.common import TRUST_REMOTE_CODE_HELP, fail, parse_pairs


def register(app: typer.Typer) -> None:
    app.command()(serve)


def serve(
    model: str = typer.Option(None, help="Model spec: catalog name, .gguf, folder, hub id, openai:MODEL@URL, or toy."),
    config: Path = typer.Option(None, "--config", help="TOML or JSON file of server settings (flags override it)."),
    host: str = typer.Option(None, help="Address to listen on (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default 8000)."),
    served_model_name: str = typer.Option(None, help="The model name clients use (default: the spec)."),
    engine: str = typer.Option(None, help="auto | hf | llamacpp | vllm | openai"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda if present)"),
    api_key: str = typer.Option(
        None,
        envvar="PISCALE_API_KEY",
        help="Require this key on /v1 and tokenizer routes. Prefer $PISCALE_API_KEY or --api-key-file: "
        "a key on the command line shows in the process list.",
    ),
    algorithm: str = typer.Option(None, help="Algorithm of a request that sets a budget but no algorithm (default pf)."),
    budget: int = typer.Option(None, help="Default budget (default 1: plain generation)."),
    reward: str = typer.Option(None, help="Reward of a scaled request that names none (default judge)."),
    allow_reward: list[str] = typer.Option([], "--allow-reward", help="Another reward spec requests may name (repeatable)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Default algorithm option KEY=VALUE (repeatable)."),
    engine_option: list[str] = typer.Option(
        [], "--engine-option", help="Engine argument KEY=VALUE, e.g. max_sequences=64 for llama.cpp (repeatable)."
    ),
    max_budget: int = typer.Option(None, help="Largest budget a request may ask for (default 64)."),
    max_tokens: int = typer.Option(None, help="Largest max_tokens a request may ask for (default 4096)."),
    timeout: float = typer.Option(None, "--timeout", help="Per-request timeout in seconds (default 600)."),
    sequence_cache: int = typer.Option(None, help="Finished sequences kept for continuation (default 32; 0: off)."),
    max_body_bytes: int = typer.Option(None, help="Largest request body read; larger gets 413 (default 1048576)."),
    max_request_sequences: int = typer.Option(
        None, help="Most sequences one request may hold: prompts x n, or prompts x budget; more gets 413 (default 256)."
    ),
    max_sequences: int = typer.Option(
        None, help="Most sequences held by all running requests; others wait in arrival order (default 512)."
    ),
    max_queue: int = typer.Option(None, help="Most requests waiting for room; one more gets 429 (default 64)."),
    max_concurrency: int = typer.Option(
        None, help="Most requests handled at once, streams and waiting ones included; one more gets 429 (default 128)."
    ),
    grading_workers: int = typer.Option(
        None, help="Processes that grade answers for the verify reward, off the event loop (default 1; 0: in process)."
    ),
    grading_timeout: float = typer.Option(None, help="Seconds one grading may take before its worker is killed (default 10)."),
    api_key_file: Path = typer.Option(
        None, "--api-key-file", help="Read the API key from this file (keeps it out of the process list)."
    ),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    trust_remote_code: bool = typer.Option(None, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Serve a model behind the OpenAI API, with inference-time scaling per request."""
    import uvicorn

    from piscale.serve import ServerConfig, create_app, load_config

    try:
        if api_key_file is not None:
            if api_key is not None:
                raise ValueError("give the API key one way: --api-key (or $PISCALE_API_KEY) or --api-key-file")
            api_key = read_api_key(api_key_file)
        base = load_config(config) if config is not None else ServerConfig()
        settings = base.with_overrides(
            model=model,
            host=host,
            port=port,
            served_model_name=served_model_name,
            engine=engine,
            device=device,
            api_key=api_key,
            algorithm=algorithm,
            budget=budget,
            reward=reward,
            max_budget=max_budget,
            max_tokens=max_tokens,
            request_timeout=timeout,
            sequence_cache=sequence_cache,
            max_body_bytes=max_body_bytes,
            max_request_sequences=max_request_sequences,
            max_sequences=max_sequences,
            max_queue=max_queue,
            max_concurrency=max_concurrency,
            grading_workers=grading_workers,
            grading_timeout=grading_timeout,
            trust_remote_code=trust_remote_code,
            rewards=(*base.rewards, *allow_reward) if allow_reward else None,
            options={**base.options, **parse_pairs(option)} if option else None,
            engine_options={**base.engine_options, **parse_pairs(engine_option, "--engine-option")} if engine_option else None,
        )
    except ValueError as error:
        fail(str(error))
    from piscale.lm import load

    try:
        lm = load(settings.model, engine=settings.engine, device=settings.device, **settings.backend_options)
    except (ValueError, TypeError, FileNotFoundError, OSError, ImportError) as error:
        fail(f"cannot load the model {settings.model!r}: {error}")
    typer.secho(
        f"piscale serve: {settings.model} as {settings.model_name!r} on http://{settings.host}:{settings.port}/v1"
        + (" (API key required)" if settings.api_key else ""),
        err=True,
    )
    if settings.api_key is None and not is_loopback(settings.host):
        typer.secho(
            f"piscale serve: warning: listening on {settings.host} without an API key: anyone who can reach "
            "this port can use the model. Set $PISCALE_API_KEY or --api-key-file.",
            err=True,
            fg="yellow",
        )
    # uvicorn's own limit is a backstop above the server's, which answers
    # 429 in the OpenAI shape and keeps /health and /metrics open.
    uvicorn.run(
        create_app(settings, lm),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        limit_concurrency=settings.max_concurrency + 64,
    )


def read_api_key(path: Path) -> str:
    """The key in ``path``: its text without surrounding whitespace."""
    try:
        key = path.read_text().strip()
    except OSError as error:
        raise ValueError(f"cannot read the API key file {path}: {error.strerror or error}") from None
    if not key:
        raise ValueError(f"the API key file {path} is empty")
    return key


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
