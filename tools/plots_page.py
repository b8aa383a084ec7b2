"""Write .dvc/plots/page.html, the page `dvc plots show` fills (`plots.html_template` in
.dvc/config): DVC's own page with Vega, Vega-Lite and Vega-Embed (BSD-3-Clause) inline instead
of loaded from a CDN, so that every chart draws with no network.

    .venv/bin/python tools/plots_page.py      # needs vl-convert-python (the test extra)

The bundle is vl-convert's: the three libraries and their dependencies in one script that sets
window.vegaEmbed, the function DVC's chart snippets call. tests/test_browse.py checks that the
committed page is what this writes and that it draws every chart offline.
"""
from __future__ import annotations

from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / ".dvc" / "plots" / "page.html"


def page() -> str:
    import vl_convert
    bundle = vl_convert.javascript_bundle()
    # DVC fills the page by plain replacement of these; the bundle must not contain them, nor
    # end the script tag it sits in.
    assert "</script" not in bundle and not any(
        f"{{{name}}}" in bundle for name in ("plot_divs", "scripts", "refresh_tag"))
    return f"""<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite and Vega-Embed (BSD-3-Clause), bundled by vl-convert \
{vl_convert.__version__}: written by tools/plots_page.py -->
    <script>{bundle}</script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


if __name__ == "__main__":
    PAGE.write_text(page())
    print(f"wrote {PAGE.relative_to(PAGE.parents[2])}")
