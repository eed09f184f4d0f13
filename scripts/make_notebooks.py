"""Write notebooks/analyst.ipynb from the cells below (kept as code so reviews see plain diffs).

.venv/bin/python scripts/make_notebooks.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "analyst.ipynb"

CELLS = [
    new_markdown_cell(
        "# Population health: a first look (analyst)\n\n"
        "Reads the lake as the `analyst` role: silver and gold only, no identifier column, every read "
        "audited. Set `EHRLAKE_LAKE` to the lake root (default `./lake` after `make demo`). Aggregates "
        "that leave the platform come from the suppressed gold tables."
    ),
    new_code_cell(
        "import os\n"
        "if os.path.basename(os.getcwd()) == 'notebooks':\n"
        "    os.chdir('..')  # configuration and keys are found from the repository root\n"
        "from ehrlake import lake as lakes\n\n"
        "lk = lakes.open(os.environ.get('EHRLAKE_LAKE', './lake'))\n"
        "spark = lk.spark\n"
        "for table in ['silver.patient', 'silver.condition', 'gold.eda_condition_prevalence']:\n"
        "    lk.read(table, role='analyst').createOrReplaceTempView(table.replace('.', '_'))\n"
        "sorted(lk.read('silver.patient', role='analyst').columns)"
    ),
    new_markdown_cell("## Prevalence by region (Spark SQL over silver, then pandas)"),
    new_code_cell(
        "prevalence = spark.sql('''\n"
        "    SELECT coalesce(p.state, '(unknown)') AS region, c.display AS condition,\n"
        "           COUNT(DISTINCT c.patient_key) AS persons,\n"
        "           ROUND(1000 * COUNT(DISTINCT c.patient_key) / MAX(t.population), 1) AS per_1000\n"
        "    FROM silver_condition c\n"
        "    JOIN silver_patient p USING (patient_key)\n"
        "    JOIN (SELECT state, COUNT(*) AS population FROM silver_patient GROUP BY state) t\n"
        "      ON t.state <=> p.state\n"
        "    GROUP BY 1, 2 ORDER BY persons DESC LIMIT 15\n"
        "''').toPandas()\n"
        "prevalence"
    ),
    new_markdown_cell("## Trend of the top conditions (suppressed gold table)"),
    new_code_cell(
        "import matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n\n"
        "trend = lk.read('gold.eda_condition_prevalence', role='analyst').toPandas()\n"
        "counts = trend.fillna({'persons': 0}).groupby(['year', 'display'])['persons'].sum()\n"
        "by_year = counts.unstack(fill_value=0)\n"
        "ax = by_year[by_year.sum().nlargest(5).index].plot(marker='o', figsize=(8, 4))\n"
        "ax.set_ylabel('persons (small cells hidden)')\n"
        "plt.savefig(os.environ.get('EHRLAKE_PLOT', '/tmp/ehrlake-trend.png'))\n"
        "print(f'{int(trend.suppressed.notna().sum())} of {len(trend)} cells suppressed')"
    ),
]


def main() -> None:
    notebook = new_notebook(cells=CELLS)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    OUT.parent.mkdir(exist_ok=True)
    nbformat.write(notebook, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
