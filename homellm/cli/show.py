"""`homellm show NAME`: what a model is: architecture, size, quantization, template, license."""
from __future__ import annotations

import argparse
import json

HELP = "show a model's architecture, parameters, quantization, context, chat template, license"
TEMPLATE_LINES = 8


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("name", metavar="NAME", help="catalog name (see `homellm list`)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--template", action="store_true", help="print the whole chat template")


def main(args: argparse.Namespace) -> int:
    from homellm.catalog import get
    from homellm.cli.list import human_count, human_size

    entry = get(args.name)
    s = entry.summary
    if args.json:
        print(json.dumps(dict(entry.to_json(), path=str(entry.path)), indent=2, ensure_ascii=False))
        return 0
    template = s.get("chat_template")
    if args.template:
        print(template or "")
        return 0
    types = ", ".join(f"{k} x{v}" for k, v in sorted((s.get("tensor_types") or {}).items(),
                                                      key=lambda kv: -kv[1]))
    heads = f"{s.get('num_attention_heads')} heads ({s.get('num_key_value_heads')} kv)"
    source = entry.source
    origin = source.get("package") or source.get("spec") or source.get("path") or "?"
    rows = [
        ("name", entry.name),
        ("display name", s.get("display_name") or "-"),
        ("architecture", s.get("architecture") or "?"),
        ("parameters", f"{human_count(s.get('n_params'))} ({s.get('n_params'):,})"
         if s.get("n_params") else "?"),
        ("quantization", f"{entry.quant} ({types})" if types else entry.quant),
        ("context length", str(s.get("context_length", "?"))),
        ("shape", f"hidden {s.get('hidden_size')}, {s.get('num_hidden_layers')} layers, {heads}, "
                  f"vocab {s.get('vocab_size')}"),
        ("license", s.get("license") or "unknown (not in the file)"),
        ("format", entry.format),
        ("size on disk", f"{human_size(entry.size)} in {len(entry.files)} file"
                         f"{'s' if len(entry.files) != 1 else ''}"),
        ("source", f"{source.get('kind', '?')}: {origin}"),
        ("pulled", entry.created),
        ("path", str(entry.path)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}   {v}")
    if template:
        lines = template.splitlines()
        print(f"\n  chat template ({len(lines)} lines{', first ' + str(TEMPLATE_LINES) if len(lines) > TEMPLATE_LINES else ''};"
              " --template prints it all)")
        for line in lines[:TEMPLATE_LINES]:
            print(f"    {line}")
    else:
        print("\n  chat template   none in the file (chat uses the turn format its vocabulary has "
              "tokens for: Gemma's, else ChatML)")
    return 0
