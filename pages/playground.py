"""Playground: try a prompt. The cost and the budgets left update as the widgets change, before anything is
spent; Generate shows the service's progress live; every result stays in the gallery with its provider, seed,
cost, time and attempts, can run again with the same seed, and downloads. One prompt on several providers side by
side. Every rule is core's: the estimate and budgets are core.playground's, the run is the generation service's.
People's text (prompts, provider messages) is shown as text, never as markup."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import streamlit as st

from common.errors import BudgetExceeded, ImagegateError, InvalidInput, PermissionDenied
from core.catalog import PROVIDERS
from core.generation.models import GenerationFailed, GenerationRequest, GenerationResult, ProgressUpdate
from core.generation.service import generate_sync
from core.money import format_usd
from core.playground import Estimate, estimate
from core.presets import PRESET_LABELS, PRESET_NAMES
from core.prompts import prompt_problem
from ui import state
from ui.widgets import field_errors_at

user = state.require_user()
actor = user.actor()

GALLERY = "pg.gallery"
COMPARE = "pg.compare"
PENDING = "pg.again"
MAX_GALLERY = 24
POLICIES = {
    "": "Routing: the global policy",
    "priority": "Routing: by priority",
    "cheapest": "Routing: cheapest",
    "fastest": "Routing: fastest",
}
PRESETS = {"": "The default preset", "none": "No preset", **{p: PRESET_LABELS[p] for p in PRESET_NAMES}}


def _route_label(choice: str) -> str:
    return POLICIES.get(choice) or f"{PROVIDERS[choice].label} ({choice})"


def _on(request: GenerationRequest, provider: str) -> GenerationRequest:
    """The request on exactly this provider (no fallback): for side-by-side runs."""
    return replace(request, provider=provider, policy=None, allow_fallback=False)


def _cost(result: GenerationResult) -> str:
    kind = "live" if result.cost.live else "simulated"
    return f"{format_usd(result.cost.actual_micro_usd)} ({kind})"


def _run(request: GenerationRequest, title: str) -> GenerationResult | None:
    """One request through the generation service, its progress written live into a status box."""
    with st.status(title, expanded=True) as box:

        def progress(update: ProgressUpdate) -> None:
            st.text(update.line)  # provider logs and messages: text, never markup

        try:
            result = generate_sync(request, actor, factory=state.runtime().sessions, on_progress=progress)
        except BudgetExceeded as exc:
            box.update(label="Refused by a budget: nothing was spent", state="error", expanded=True)
            st.error(str(exc))
            return None
        except GenerationFailed as exc:
            box.update(label="Every attempt failed", state="error", expanded=True)
            st.error(str(exc))
            return exc.result
        except (InvalidInput, PermissionDenied) as exc:
            box.update(label="Not sent", state="error", expanded=True)
            st.error(str(exc))
            return None
        except ImagegateError as exc:
            box.update(label="Failed", state="error", expanded=True)
            st.error(str(exc))
            return None
        box.update(
            label=f"Done on {result.provider} ({result.mode}) in {result.timings.total_s:.1f} s: {_cost(result)}",
            state="complete",
            expanded=False,
        )
        return result


def _remember(request: GenerationRequest, result: GenerationResult | None) -> None:
    if result is not None:
        gallery: list[tuple[GenerationRequest, GenerationResult]] = st.session_state.setdefault(GALLERY, [])
        gallery.insert(0, (request, result))
        del gallery[MAX_GALLERY:]


def _show_result(request: GenerationRequest, result: GenerationResult, key: str, *, again: bool = True) -> None:
    """One result: prompt, provider, seed, cost and time, its images (each downloadable), every attempt."""
    st.text(f"prompt: {request.prompt}")
    seed = result.seed if result.seed is not None else "—"
    st.text(
        f"{result.provider or 'no provider'} ({result.mode or '—'}) · seed {seed} · cost {_cost(result)} · "
        f"{result.timings.total_s:.2f} s · {len(result.attempts)} attempt(s) · {result.status.value}"
    )
    shown = [(i, image) for i, image in enumerate(result.images) if Path(image.path).exists()]
    if shown:
        grid = st.columns(min(2, len(shown)))
        for n, (i, image) in enumerate(shown):
            path = Path(image.path)
            with grid[n % len(grid)]:
                st.image(str(path), width="stretch")
                st.download_button(
                    f"Download image {i + 1}",
                    data=path.read_bytes(),
                    file_name=f"imagegate-{result.generation_id[:8]}-{i + 1}.{image.format.lower()}",
                    mime=f"image/{image.format.lower()}",
                    key=f"{key}.dl.{i}",
                    icon=":material/download:",
                )
    with st.expander(f"Attempts and notes (estimate {format_usd(result.cost.estimated_micro_usd)})"):
        for attempt in result.attempts:
            timing = f"{attempt.total_ms} ms" if attempt.total_ms is not None else "—"
            cost = format_usd(attempt.actual_micro_usd) if attempt.actual_micro_usd is not None else "held"
            st.text(f"{attempt.attempt_no}. {attempt.why} · {attempt.billing or '—'} · {cost} · {timing}")
        for adjustment in result.adjustments:
            st.text(f"{adjustment.kind.value}: {adjustment.message}")
    if again and result.ok and st.button("Run again with the same seed", key=f"{key}.again"):
        params = {**dict(request.params), "seed": result.seed}
        st.session_state[PENDING] = replace(request, provider=result.provider, params=params)
        st.rerun()


def _estimate_headline(found: Estimate) -> None:
    st.metric(
        "Estimated cost",
        found.formatted,
        help="What this request would reserve now, at the price in force. Nothing is spent until you generate.",
    )


def _estimate_details(found: Estimate) -> None:
    if found.provider is not None:
        where = "simulated: not a real charge" if found.simulated else "live: real money"
        st.caption(f"on {found.provider} ({found.mode}, {where})")
        st.caption(" · ".join(found.breakdown))
    if not found.budgets:
        st.caption("No budget applies to this request.")
    for budget in found.budgets:
        st.progress(budget.used_share, text=budget.describe())
    refused = found.refused_by
    if refused is not None:
        st.warning(
            f"{refused.name} has {format_usd(refused.left_micro_usd)} left: it refuses this request on "
            f"{found.provider}; with fallback on, the next provider of the route may take it."
        )
    if found.route:
        with st.expander("Route"):
            for line in found.route:
                st.text(line)


st.title("Playground")
st.caption(
    "Try a prompt. The estimate and your budgets update as you change the settings; nothing is spent until "
    "you press Generate."
)

with state.db_session() as session:
    form, panel = st.columns([3, 2], gap="large")
    slots: dict[str, Any] = {}
    with form:
        prompt = st.text_area("Prompt", key="pg.prompt", max_chars=4000, placeholder="a red fox in snow")
        slots["prompt"] = st.empty()
        negative = st.text_input("Negative prompt", key="pg.negative")
        slots["negative_prompt"] = st.empty()
        a, b = st.columns(2)
        choice = a.selectbox(
            "Provider or routing policy", [*POLICIES, *PROVIDERS], format_func=_route_label, key="pg.route"
        )
        slots["provider"] = a.empty()
        preset = b.selectbox("Preset", list(PRESETS), format_func=PRESETS.__getitem__, key="pg.preset")
        slots["preset"] = b.empty()
        size = a.text_input("Image size", key="pg.size", placeholder="square_hd, 16:9 or 1024x768; empty: default")
        slots["image_size"] = a.empty()
        count = b.slider("Images", min_value=1, max_value=8, value=1, step=1, key="pg.count")
        slots["num_images"] = b.empty()
        seed_text = a.text_input("Seed", key="pg.seed", placeholder="empty: random")
        slots["seed"] = a.empty()
        fallback = b.toggle(
            "Fall back to other providers", value=True, key="pg.fallback", help="Off: only the route's first runs."
        )

    params: dict[str, Any] = {"num_images": int(count)}
    if size.strip():
        params["image_size"] = size.strip()
    if seed_text.strip():
        params["seed"] = int(seed_text) if seed_text.strip().isdigit() else seed_text.strip()
    named = choice if choice in PROVIDERS else None
    base = GenerationRequest(
        prompt,
        negative_prompt=negative or None,
        provider=named,
        policy=None if named or not choice else choice,
        preset=preset or None,
        params=params,
        allow_fallback=None if fallback else False,
    )
    found = estimate(session, base, user_id=user.id)
    errors: Mapping[str, str] = {key.rsplit(".", 1)[-1]: message for key, message in found.field_errors.items()}
    unplaced = field_errors_at(slots, errors)
    with panel:
        _estimate_headline(found)
        # Right under the cost, whose height never changes, and always enabled: a value typed and not yet applied
        # is applied by the click on Generate itself, and that click must land on the button (not beside it,
        # moved by the rerun) and must not meet a button disabled until the value applied. A request nothing
        # can run is refused by the service, which says why.
        go = st.button("Generate", type="primary")
        _estimate_details(found)
        for message in unplaced:
            st.error(message)
        if found.error and not found.field_errors:
            st.error(found.error)
    missing = prompt_problem(prompt)  # shown at the field on a click; the run would refuse it the same way
    if go and missing is not None:
        field_errors_at(slots, {"prompt": missing})
        go = False

    pending = st.session_state.pop(PENDING, None)
    if go or pending is not None:
        request = pending if pending is not None else base
        _remember(request, _run(request, "Generating…"))

    st.subheader("Gallery")
    gallery = st.session_state.get(GALLERY, [])
    if not gallery:
        st.caption("Your results appear here.")
    cards = st.columns(2)
    for i, (request, result) in enumerate(gallery):
        with cards[i % 2], st.container(border=True):
            _show_result(request, result, f"gal.{result.generation_id}")

    st.subheader("Side by side")
    compare = st.multiselect(
        "Run this prompt on several providers",
        list(PROVIDERS),
        key="pg.compare.providers",
        format_func=lambda p: PROVIDERS[p].label,
    )
    if compare:
        columns = st.columns(len(compare))
        for column, provider in zip(columns, compare, strict=True):
            each = estimate(session, _on(base, provider), user_id=user.id)
            column.metric(PROVIDERS[provider].label, each.formatted, help="estimate before running")
        run_each = st.button("Run on each", key="pg.compare.go")
        if run_each and missing is not None:
            st.error(missing)
        elif run_each:
            runs = []
            for provider in compare:
                request = _on(base, provider)
                runs.append((request, _run(request, f"{PROVIDERS[provider].label}…")))
            st.session_state[COMPARE] = runs
        done = [(r, res) for r, res in st.session_state.get(COMPARE, []) if res is not None]
        if done:
            for column, (request, result) in zip(st.columns(len(done)), done, strict=True):
                with column:
                    _show_result(request, result, f"cmp.{result.generation_id}", again=False)
