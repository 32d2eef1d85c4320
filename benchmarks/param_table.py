"""The Markdown table the parameter-count benchmarks print (openuni_params, harmon_params, showo_params)."""


def table(all_counts: dict[str, dict[str, int]], first_column: str = "module") -> str:
    """One column per configuration, one row per counted part: ``1,234,567 (1.2M)``."""
    names = list(all_counts)
    lines = [f"| {first_column} | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in next(iter(all_counts.values())):
        cells = [f"{all_counts[n][row]:,} ({all_counts[n][row] / 1e6:.1f}M)" for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
