"""results.md (a headline table, then one section per benchmark) and latency_vs_size.png."""

import datetime


TITLES = {
    "tokens": "1. Visual tokens per image: VGR (20 crops) against LLaVA-NeXT",
    "decode": "2. Decode overhead: VGR without replay against `LlamaForCausalLM.generate`, same weights and context",
    "replay": "3. Replay cost against a K-token prefill at the same position; vision-tower passes",
    "e2e": "4. End to end against LLaVA-NeXT on the same weights (mid-size, fp32)",
    "image_processing": "5. Image processing throughput",
    "size_latency": "Latency against image size (time to first token)",
    "batch": "6. Batch scaling with replays at different steps",
    "training": "7. A training step: the LM head once per position",
}


def machine_line(results) -> str:
    m = results["machine"]
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gb']} GB; "
            f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}")


def summary(results) -> str:
    b = results["benchmarks"]
    rows = []
    if "tokens" in b:
        largest = b["tokens"]["largest"]
        rows.append((
            f"1. visual tokens, {largest['image'].removeprefix('synthetic_')}",
            f"VGR {largest['vgr_tokens']} / LLaVA-NeXT {largest['llava_next_tokens']} = "
            f"**{largest['ratio_vs_llava_next']:.2f}**; / 5 x 576 = {largest['llava_next_no_unpad_tokens']}: "
            f"**{largest['ratio_vs_no_unpad']:.2f}**",
            "about 0.30 (paper, against 5 x 576)",
        ))
    if "decode" in b:
        for row in b["decode"]["rows"]:
            rows.append((
                f"2. decode ms/token, VGR / LLaMA ({row['config']}, {row['parameters_m']:.0f} M, "
                f"context {row['context_tokens']})",
                f"{row['vgr_ms_per_token']:.2f} / {row['llama_ms_per_token']:.2f} = **{row['ratio']:.3f}** "
                f"(+{row['overhead_ms_per_token']:.2f} ms/token)",
                f"<= {b['decode']['goal']}",
            ))
    if "replay" in b:
        r = b["replay"]
        largest = max(r["rows"], key=lambda row: row["replayed_tokens"])
        one = r["vision_tower"]["one_image_4_replays"]
        rows.append((
            f"3. replay of K = {largest['replayed_tokens']} tokens: extra step time / K-token prefill",
            f"{largest['replay_extra_ms']:.0f} ms / {largest['prefill_k_tokens_ms']:.0f} ms = "
            f"**{largest['extra_over_prefill']:.2f}**",
            "about 1 (a prefill of K tokens, no prefix recomputed)",
        ))
        rows.append((
            "3. crops through the vision tower in a generate with 4 replays",
            f"**{one['crops_encoded']}** = the image's {one['crops_of_the_image']} (in {one['vision_tower_calls']} "
            "call(s) of `vision_chunk_bytes`)",
            "each image once",
        ))
    if "e2e" in b:
        by = {row["method"]: row for row in b["e2e"]["rows"]}
        vgr, llava, two = by["vgr"], by["llava_next"], by["two_pass"]
        rows.append((
            "4. end to end, 64 tokens: total s (first token s), peak RSS MB",
            f"VGR 2 replays {vgr['total_s']:.2f} ({vgr['ttft_s']:.2f}), {vgr.get('memory_peak_rss_mb', 0):.0f}; "
            f"LLaVA-NeXT {llava['total_s']:.2f} ({llava['ttft_s']:.2f}), {llava.get('memory_peak_rss_mb', 0):.0f}; "
            f"two-pass {two['total_s']:.2f} ({two['ttft_s']:.2f}), {two.get('memory_peak_rss_mb', 0):.0f}",
            f"VGR / LLaVA-NeXT **{vgr['total_vs_llava_next']:.2f}**, VGR / two-pass "
            f"**{vgr['total_s'] / two['total_s']:.2f}**",
        ))
    if "image_processing" in b:
        row = b["image_processing"]["rows"][0]
        rows.append((
            f"5. image processing, {row['images']}",
            f"VGR {row['vgr_ms_per_image']:.1f} ms/image, LLaVA-NeXT {row['llava_next_ms_per_image']:.1f} ms/image",
            f"time ratio **{row['time_ratio_vgr_over_llava_next']:.2f}**",
        ))
    if "batch" in b:
        rows_b = b["batch"]["rows"]
        text = ", ".join(f"b{row['batch']} {row['decode_tokens_per_s']:.0f}" for row in rows_b)
        no = ", ".join(f"b{row['batch']} {row['no_replay_decode_tokens_per_s']:.0f}" for row in rows_b)
        rows.append(("6. decoding tokens/s with one replay per row", text, f"without replays: {no}"))
    if "training" in b:
        by = {row["method"]: row for row in b["training"]["rows"]}
        text = ", ".join(f"{method} {row['seconds']:.2f} s ({row['peak_over_before_mb']:.0f} MB)"
                         for method, row in by.items())
        versus = f"trainer / plain **{by['trainer']['vs_plain']:.2f}**"
        if "before" in by:
            versus += f", before / plain **{by['before']['vs_plain']:.2f}**"
        rows.append(("7. training step, mid-size, s (peak over the loaded model)", text, versus))
    lines = ["| benchmark | measured | expectation / comparison |", "|---|---|---|"]
    lines += [f"| {a} | {b_} | {c} |" for a, b_, c in rows]
    return "\n".join(lines)


def markdown(results, modules) -> str:
    parts = [
        "# transformers-vgr benchmarks",
        "",
        f"Machine: {machine_line(results)}. Run: {datetime.date.today().isoformat()}, "
        f"`make bench` took {results['total_seconds'] / 60:.1f} min"
        + (" (--quick: 2 rounds, not for quoting)." if results.get("quick") else "."),
        "",
        "Times are medians of A/B-interleaved rounds on a shared machine; ratios are medians of per-round ratios. "
        "Models have random weights (speed does not depend on them) and are forced to write the same tokens.",
        "",
        summary(results),
    ]
    if "mid_config" in results:
        c = results["mid_config"]
        parts += [
            "",
            f"Mid-size configuration (benchmarks 2 to 7): CLIP hidden {c['vision']['hidden_size']} x "
            f"{c['vision']['num_hidden_layers']} layers at {c['vision'].get('image_size', 336)} px, patch "
            f"{c['vision'].get('patch_size', 14)} + LLaMA hidden {c['text']['hidden_size']} x "
            f"{c['text']['num_hidden_layers']} layers (intermediate {c['text']['intermediate_size']}, vocabulary "
            f"{c['text']['vocab_size']}), fp32: VGR {c['vgr_parameters_m']:.0f} M parameters.",
        ]
    for name, module in modules.items():
        result = results["benchmarks"][name]
        doc = (module.__doc__ or "").strip().split("\n\n")
        parts += ["", f"## {TITLES.get(name, name)}", ""]
        # The docstring opens with its own title ("N. Name: ..."): the heading says it already.
        first = " ".join(doc[0].split()).split(": ", 1)[-1] if doc else ""
        for text in [first[:1].upper() + first[1:]] + doc[1:]:
            parts += [paragraph(text), ""]
        parts += [module.markdown(result), "", f"({result['seconds']:.0f} s)"]
    return "\n".join(parts) + "\n"


def paragraph(text: str) -> str:
    """A docstring paragraph as markdown: lines joined, "- " items kept as a list."""
    items, current = [], []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("- ") and current:
            items.append(" ".join(current))
            current = []
        current.append(line)
    items.append(" ".join(current))
    return "\n".join(items)


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = results["benchmarks"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    if "tokens" in b:
        rows = sorted((row for row in b["tokens"]["rows"] if row["kind"] == "synthetic"),
                      key=lambda row: row["width"] * row["height"])
        mp = [row["width"] * row["height"] / 1e6 for row in rows]
        axes[0].plot(mp, [row["vgr_tokens"] for row in rows], "o-", label="VGR (20 crops, pooled)")
        axes[0].plot(mp, [row["llava_next_tokens"] for row in rows], "s-", label="LLaVA-NeXT (transformers)")
        axes[0].plot(mp, [row["llava_next_no_unpad_tokens"] for row in rows], "s:", color="gray",
                     label="LLaVA-NeXT, 576 per crop")
        for row, x in zip(rows, mp):
            axes[0].annotate(f"{row['width']}x{row['height']}", (x, row["vgr_tokens"]), fontsize=6,
                             textcoords="offset points", xytext=(0, -10), ha="center")
        axes[0].set_xlabel("image size (megapixels)")
        axes[0].set_ylabel("visual tokens in the prompt")
        axes[0].set_title("Visual tokens per image")
        axes[0].legend(fontsize=8)
        axes[0].grid(alpha=0.3)
    if "size_latency" in b:
        rows = b["size_latency"]["rows"]
        mp = [row["megapixels"] for row in rows]
        axes[1].plot(mp, [row["vgr_ttft_s"] for row in rows], "o-", label="VGR: first token")
        axes[1].plot(mp, [row["vgr_vision_s"] for row in rows], "o--", color="C0", alpha=0.6,
                     label="VGR: vision tower")
        axes[1].plot(mp, [row["llava_next_ttft_s"] for row in rows], "s-", color="C1", label="LLaVA-NeXT: first token")
        axes[1].plot(mp, [row["llava_next_vision_s"] for row in rows], "s--", color="C1", alpha=0.6,
                     label="LLaVA-NeXT: vision tower")
        for row, x in zip(rows, mp):
            axes[1].annotate(f"{row['width']}x{row['height']}", (x, row["vgr_ttft_s"]), fontsize=6,
                             textcoords="offset points", xytext=(0, 6), ha="center")
        axes[1].set_xlabel("image size (megapixels)")
        axes[1].set_ylabel("seconds")
        axes[1].set_title("Time to first token (mid-size model, CPU)")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    figure.suptitle(machine_line(results), fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
