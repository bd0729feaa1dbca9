"""The drift check: what the service saw in a window against what the champion was trained on.

Each feature that the service records and training saved as the reference (crop brightness,
contrast and sharpness; predicted age and P(female)) is compared with a two-sample
Kolmogorov-Smirnov test (scipy.stats.ks_2samp). A feature drifts when the test's p-value is
below `monitor.drift.p_value` and its statistic, the largest gap between the two cumulative
distributions (0..1, independent of the sample sizes), is at least `min_statistic`: with a
hundred thousand records any tiny difference is "significant", so the size of the gap
decides too. The window drifts when at least `min_drifted_features` features drift.

scipy.stats rather than Evidently: the test and the effect size are all the check needs, and
Evidently 0.7 would add 25 packages to the lock (a web framework, nltk, statsmodels,
plotly, and a `multipart` module that shadows python-multipart's, which parses uploads).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from agegender.config import DriftParams
from agegender.monitoring import CROP_STATS

FEATURES = (*CROP_STATS, "age", "female")
DESCRIPTIONS = {
    "brightness": "crop brightness (mean gray level)",
    "contrast": "crop contrast (gray level std)",
    "sharpness": "crop sharpness (variance of the Laplacian)",
    "age": "predicted age, years",
    "female": "predicted P(female)",
}


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    statistic: float
    p_value: float
    reference_median: float
    window_median: float
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    """One drift check; `drifted` is the decision, `enough` says whether there was data to decide on."""

    model: str
    window_start: str
    window_end: str
    reference_faces: int
    window_faces: int
    settings: DriftParams
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def enough(self) -> bool:
        return self.window_faces >= self.settings.min_faces

    @property
    def drifted_features(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]

    @property
    def drifted(self) -> bool:
        return self.enough and len(self.drifted_features) >= self.settings.min_drifted_features

    @property
    def summary(self) -> str:
        where = f"{self.window_faces} faces served by {self.model} from {self.window_start} to {self.window_end}"
        if not self.enough:
            return f"No decision: {where}, fewer than monitor.drift.min_faces = {self.settings.min_faces}"
        verdict = "DRIFT" if self.drifted else "No drift"
        names = ", ".join(self.drifted_features) or "none"
        return (
            f"{verdict}: {len(self.drifted_features)} of {len(self.features)} features drifted ({names}); "
            f"threshold monitor.drift.min_drifted_features = {self.settings.min_drifted_features}; {where} "
            f"against {self.reference_faces} training crops"
        )

    def as_dict(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k != "settings"},
            "settings": self.settings.model_dump(mode="json"),
            "enough": self.enough,
            "drifted": self.drifted,
            "drifted_features": self.drifted_features,
            "summary": self.summary,
        }

    def table(self) -> list[dict]:
        """One row per feature, as the Prefect table artifact shows it."""
        return [
            {
                "feature": f.feature,
                "KS statistic": round(f.statistic, 4),
                "p-value": float(f"{f.p_value:.3g}"),
                "reference median": round(f.reference_median, 3),
                "window median": round(f.window_median, 3),
                "drifted": f.drifted,
            }
            for f in self.features
        ]

    def markdown(self) -> str:
        lines = [f"# Drift check: {'DRIFT' if self.drifted else 'no drift'}", "", self.summary, ""]
        if self.features:
            rows = self.table()
            lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
        return "\n".join(lines) + "\n"


def check_drift(
    reference: pd.DataFrame, window: pd.DataFrame, settings: DriftParams, *, model: str, start: str, end: str
) -> DriftReport:
    """Compare the served faces in `window` with the training `reference`, feature by feature."""
    from scipy.stats import ks_2samp

    missing = [name for name in FEATURES if name not in reference.columns]
    if missing:
        raise ValueError(f"the reference lacks the columns {missing}; was the model trained before drift references?")
    features = []
    if len(window) >= settings.min_faces:
        for name in FEATURES:
            test = ks_2samp(reference[name].to_numpy(), window[name].to_numpy())
            statistic, p_value = float(test.statistic), float(test.pvalue)
            features.append(
                FeatureDrift(
                    feature=name,
                    statistic=statistic,
                    p_value=p_value,
                    reference_median=float(reference[name].median()),
                    window_median=float(window[name].median()),
                    drifted=p_value < settings.p_value and statistic >= settings.min_statistic,
                )
            )
    return DriftReport(
        model=model,
        window_start=start,
        window_end=end,
        reference_faces=len(reference),
        window_faces=len(window),
        settings=settings,
        features=features,
    )


def report_html(report: DriftReport, reference: pd.DataFrame, window: pd.DataFrame) -> str:
    """A self-contained HTML page: the decision, the table and each feature's two histograms."""
    rows = report.table()
    head = "".join(f"<th>{html.escape(name)}</th>" for name in rows[0]) if rows else ""
    body = "".join(
        f"<tr class={'drift' if row['drifted'] else 'ok'}>"
        + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values())
        + "</tr>"
        for row in rows
    )
    figure = f'<img alt="histograms" src="data:image/png;base64,{plot_histograms(reference, window)}">' if rows else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>agegender drift check</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
tr.drift{{background:#fdd}}img{{max-width:100%}}</style></head><body>
<h1>Drift check: {"DRIFT" if report.drifted else "no drift"}</h1>
<p>{html.escape(report.summary)}</p>
<p>A feature drifts when its two-sample Kolmogorov-Smirnov p-value is below {report.settings.p_value:g} and its
statistic (the largest gap between the reference's and the window's cumulative distributions) is at least
{report.settings.min_statistic:g}.</p>
<table><tr>{head}</tr>{body}</table>
{figure}
</body></html>
"""


def plot_histograms(reference: pd.DataFrame, window: pd.DataFrame) -> str:
    """Reference and window histograms of every feature, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FEATURES), figsize=(4 * len(FEATURES), 3.2))
    for ax, name in zip(axes, FEATURES, strict=True):
        values = np.concatenate([reference[name].to_numpy(), window[name].to_numpy()])
        bins = np.histogram_bin_edges(values, bins=30)
        ax.hist(reference[name], bins=bins, density=True, alpha=0.5, label="training reference")
        ax.hist(window[name], bins=bins, density=True, alpha=0.5, label="served window")
        ax.set_title(DESCRIPTIONS[name], fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()
