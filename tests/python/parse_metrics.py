"""Parses a Prometheus text-format (0.0.4) exposition with the reference parser.

Usage: parse_metrics.py < scrape.txt
Prints one JSON object:
  {"families": {name: type, ...}, "samples": [[sample_name, {label: value}, value], ...]}
Family names are the parser's (a counter `x_total` is the family `x`); sample names are
as exposed. Non-finite values are printed as the strings "NaN", "+Inf", "-Inf" so that the
output stays standard JSON. A text the parser rejects makes this script exit non-zero.
"""
import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def number(v: float):
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return v


def main() -> None:
    text = sys.stdin.read()
    families = {}
    samples = []
    for family in text_string_to_metric_families(text):
        if family.name in families:
            raise SystemExit(f"family {family.name} appears twice")
        families[family.name] = family.type
        for s in family.samples:
            samples.append([s.name, dict(s.labels), number(float(s.value))])
    json.dump({"families": families, "samples": samples}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
