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
    engine: str = typer.Option(None, help="auto | hf | llamacpp | openai"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda if present)"),
    api_key: str = typer.Option(None, envvar="PISCALE_API_KEY", help="Require this bearer key on /v1 routes."),
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
    log_level: str = typer.Option("info", help="uvicorn log level."),
    trust_remote_code: bool = typer.Option(None, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Serve a model behind the OpenAI API, with inference-time scaling per request."""
    import uvicorn

    from piscale.serve import ServerConfig, create_app, load_config

    try:
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
    uvicorn.run(create_app(settings, lm), host=settings.host, port=settings.port, log_level=log_level)
