"""Chart builders: plain functions, data in, Altair chart out (testable without a browser).

Colours follow the paper's Fig. 1: flipped training instances red, clean ones
blue, the regression line yellow, the endpoint line green. Every chart carries
``usermeta.atlas`` naming it, so tests can find it among a page's elements.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from core.analysis.shapes import DEFAULT_RULE, ShapeRule

RED = "#d62728"
BLUE = "#1f77b4"
YELLOW = "#e6b800"  # a darker yellow than pure #ff0 so the line reads on white
GREEN = "#2ca02c"
GREY = "#b0b0b0"
SHAPE_COLORS = {"S": "#7b3294", "backslash": "#f1a340", "Z": "#008837"}
POINT_DOMAIN = ["clean", "flipped", "regression", "endpoints"]
POINT_RANGE = [BLUE, RED, YELLOW, GREEN]
TEXT_CHARS = 160  # tooltips show at most this much training text


# Room above the drawing for a title's full line box. Streamlit's theme sets no top padding,
# and Vega places a title by its font size: the browser's line box (ascent above the cap
# height) then starts a few pixels above the svg, which clips it.
PADDING = {"top": 8}  # the other sides stay 0 (Streamlit adds its bottom padding)


def _tag(chart: alt.TopLevelMixin, name: str) -> alt.TopLevelMixin:
    """Name a chart in its spec (usermeta) so tests can find it, and give its title room."""
    return chart.properties(usermeta={"atlas": name}, padding=PADDING)


def _small(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """A small panel's axis text one size down and its gaps narrower than Streamlit's theme
    (14 px titles 16 px from the labels, chart title 26 px above the plot). Vega shrinks a
    plot until its rotated y title fits beside it; in a 140-170 px panel the theme's sizes
    left a plot a few pixels high and pushed the chart's title out of its frame."""
    return chart.configure_axis(
        titleFontSize=11, labelFontSize=10, titlePadding=4, labelPadding=2
    ).configure_title(offset=6)


def _shape_scale() -> alt.Scale:
    return alt.Scale(domain=list(SHAPE_COLORS), range=list(SHAPE_COLORS.values()))


def _short(text: pd.Series) -> pd.Series:
    """Tooltip-sized text."""
    s = text.astype(str)
    return s.where(s.str.len() <= TEXT_CHARS, s.str.slice(0, TEXT_CHARS) + "…")


def _curve_layers(
    df: pd.DataFrame,
    lines: pd.DataFrame,
    tooltip: list[alt.Tooltip],
    rank_title: str,
    score_title: str,
    *,
    sizes: tuple[int, int],
    stroke: float,
    legend: bool,
    clip: tuple[float, float] | None = None,
) -> list[alt.Chart]:
    """The points (by flip status) and the two lines of one sorted curve, in the paper's colours.

    With ``clip`` (lo, hi; from ``compute.robust_axis``) the y axis shows only that range:
    points beyond it sit on its edge, over-drawn with black triangles pointing the way they
    were moved, and the lines are cut at the frame. Tooltips keep the real score.
    """
    color = alt.Color(
        "status:N",
        scale=alt.Scale(domain=POINT_DOMAIN, range=POINT_RANGE),
        title=None,
        legend=alt.Legend() if legend else None,
    )
    y_field, scale = "score", alt.Undefined
    if clip is not None:
        lo, hi = clip
        df = df.assign(
            shown=df["score"].clip(lo, hi),
            clipped=np.where(df["score"] > hi, "above", np.where(df["score"] < lo, "below", "")),
        )
        y_field, scale = "shown", alt.Scale(domain=[lo, hi], nice=False, zero=False)
    # Two lines when clipped: a rotated axis title longer than a small panel's plot makes Vega
    # shrink the plot to fit it, down to a sliver that pushes the chart title out of the frame.
    y_title = score_title if clip is None else [score_title, "(axis clipped)"]
    y = alt.Y(f"{y_field}:Q", title=y_title, scale=scale)
    points = (
        alt.Chart(df)
        .mark_circle(opacity=0.85, clip=True)
        .encode(
            x=alt.X("rank:Q", title=rank_title),
            y=y,
            color=color,
            # flipped points larger: a few dozen red dots must stand out among thousands of blue
            size=alt.condition(alt.datum.flipped, alt.value(sizes[0]), alt.value(sizes[1])),
            order=alt.Order("flipped:Q"),  # flipped drawn last, on top of the blue cloud
            tooltip=tooltip,
        )
    )
    rules = (
        alt.Chart(lines.rename(columns={"line": "status"}))
        .mark_rule(strokeWidth=stroke, clip=True)
        .encode(x="x:Q", x2="x2:Q", y=alt.Y("y:Q", scale=scale), y2="y2:Q", color=color)
    )
    layers = [points, rules]
    if clip is not None:
        layers.append(
            alt.Chart(df[df["clipped"] != ""])
            .mark_point(filled=True, color="black", opacity=0.9)
            .encode(
                x="rank:Q",
                y=y,
                shape=alt.Shape(
                    "clipped:N",
                    scale=alt.Scale(
                        domain=["above", "below"], range=["triangle-up", "triangle-down"]
                    ),
                    legend=None,
                ),
                size=alt.value(sizes[0]),
                tooltip=tooltip,
            )
        )
    return layers


def curve_chart(
    curve: pd.DataFrame,
    lines: pd.DataFrame,
    *,
    title: str = "",
    height: int = 320,
    label_names: list[str] | None = None,
    score_title: str = "TracIn score",
    rank_title: str = "training instances sorted by score",
    clip: tuple[float, float] | None = None,
) -> alt.LayerChart:
    """One sorted TracIn curve: points by flip status, regression and endpoint lines.

    ``curve`` has rank, score, flipped (and optionally train_id, text, label,
    observed_label for the tooltip); ``lines`` comes from ``compute.line_rows``.
    """
    names = label_names or ["0", "1"]
    df = curve.copy()
    df["status"] = np.where(df["flipped"].to_numpy(bool), "flipped", "clean")
    tooltip: list[alt.Tooltip] = [
        alt.Tooltip("rank:Q", title="rank"),
        alt.Tooltip("score:Q", title=score_title, format=".4g"),
        alt.Tooltip("status:N", title="label"),
    ]
    if "text" in df:
        df["text"] = _short(df["text"])
        df["true"] = [names[int(v)] for v in df["label"]]
        df["observed"] = [names[int(v)] for v in df["observed_label"]]
        tooltip = [
            alt.Tooltip("train_id:Q", title="training id"),
            alt.Tooltip("text:N", title="text"),
            alt.Tooltip("observed:N", title="label used in training"),
            alt.Tooltip("true:N", title="true label"),
            *tooltip,
        ]
    layers = _curve_layers(
        df,
        lines,
        tooltip,
        rank_title,
        score_title,
        sizes=(70, 22),
        stroke=2,
        legend=True,
        clip=clip,
    )
    chart = alt.layer(*layers).properties(height=height, title=title)
    return _tag(chart, "score_curve")


SCATTER_AXES = {
    "s_bulk": "bulk S (the class rule: Z ≤ z_max … S ≥ s_min)",
    "s": "S, whole curve (the paper's index)",
    "end_ratio": "end ratio of flipped instances (%)",
    "mean_distance": "mean [CLS] distance to the training data",
}


def shape_scatter(
    shapes: pd.DataFrame,
    *,
    selected: int | None = None,
    rule: ShapeRule = DEFAULT_RULE,
    select_name: str = "pick",
    x: str = "s_bulk",
    y: str = "end_ratio",
) -> alt.LayerChart:
    """Fig. 3 / Fig. 2: an S index against end ratio or distance, one point per test instance,
    coloured by shape, clickable; the selected instance drawn large, outlined and on top."""
    cols = ["id", "shape", *dict.fromkeys([x, y, "s", "end_ratio"])]
    df = shapes[[c for c in cols if c in shapes]].copy()
    df["correct"] = shapes["correct"].to_numpy(bool) if "correct" in shapes else True
    df["prediction"] = np.where(df["correct"], "correct", "misclassified")
    df["selected"] = df["id"] == (selected if selected is not None else -1)
    pick = alt.selection_point(name=select_name, fields=["id"], on="click", toggle=False)
    y_scale = alt.Scale(domain=[0, 100]) if y == "end_ratio" else alt.Scale(zero=False)
    encoding = {
        "x": alt.X(f"{x}:Q", title=SCATTER_AXES.get(x, x), scale=alt.Scale(zero=False)),
        "y": alt.Y(f"{y}:Q", title=SCATTER_AXES.get(y, y), scale=y_scale),
        "color": alt.Color("shape:N", scale=_shape_scale(), title="shape"),
        "shape": alt.Shape(
            "prediction:N",
            scale=alt.Scale(domain=["misclassified", "correct"], range=["circle", "triangle-up"]),
            title="prediction",
        ),
        "tooltip": [
            alt.Tooltip("id:Q", title="test id"),
            alt.Tooltip("shape:N"),
            alt.Tooltip(f"{x}:Q", title=x, format=".3f"),
            alt.Tooltip(f"{y}:Q", title=y, format=".2f"),
            alt.Tooltip("prediction:N"),
        ],
    }
    points = (
        alt.Chart(df[~df["selected"]])
        .mark_point(size=80, filled=True, opacity=0.75)
        .encode(**encoding)
        .add_params(pick)
    )
    # The selected instance as its own layer, after the others: it can never hide in a cluster.
    chosen = (
        alt.Chart(df[df["selected"]])
        .mark_point(size=420, filled=True, opacity=1.0, stroke="black", strokeWidth=3)
        .encode(**encoding)
    )
    layers = []
    if x == "s_bulk":
        refs = pd.DataFrame({"x": list(rule.bounds)})
        layers.append(alt.Chart(refs).mark_rule(strokeDash=[4, 4], color=GREY).encode(x="x:Q"))
    if y == "end_ratio":
        layers.append(
            alt.Chart(pd.DataFrame({"y": [50.0]}))
            .mark_rule(strokeDash=[2, 2], color=GREY)
            .encode(y="y:Q")
        )
    chart = alt.layer(*layers, points, chosen).properties(height=420)
    return _tag(chart, "shape_scatter")


def mean_distance_chart(shapes: pd.DataFrame) -> alt.Chart:
    """Fig. 2a: mean [CLS] distance per test instance, labelled 'id (shape)', sorted."""
    df = shapes[["id", "shape", "mean_distance"]].copy()
    df["label"] = [f"{i} ({s})" for i, s in zip(df["id"], df["shape"], strict=True)]
    chart = (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X(
                "label:N",
                sort=alt.EncodingSortField("mean_distance", order="descending"),
                title="test instance (shape)",
            ),
            y=alt.Y("mean_distance:Q", title="mean distance"),
            color=alt.Color("shape:N", scale=_shape_scale()),
            tooltip=["id:Q", "shape:N", alt.Tooltip("mean_distance:Q", format=".3f")],
        )
        .properties(height=280)
    )
    return _tag(chart, "mean_distance")


def sorted_distance_chart(curves: pd.DataFrame, shapes: pd.DataFrame) -> alt.Chart:
    """Fig. 2b: each test instance's distances to the training instances, ascending."""
    lab = shapes.set_index("id")["shape"]
    df = curves.copy()
    df["shape"] = lab.loc[df["test_id"].to_numpy()].to_numpy()
    df["label"] = [f"{i} ({s})" for i, s in zip(df["test_id"], df["shape"], strict=True)]
    chart = (
        alt.Chart(df)
        .mark_line(opacity=0.7)
        .encode(
            x=alt.X("rank:Q", title="training instances sorted by distance"),
            y=alt.Y("distance:Q", title="Euclidean distance"),
            color=alt.Color("shape:N", scale=_shape_scale()),
            detail="label:N",
            tooltip=["label:N", "rank:Q", alt.Tooltip("distance:Q", format=".3f")],
        )
        .properties(height=280)
    )
    return _tag(chart, "sorted_distances")


ROLE_STYLE = {  # role -> (colour, mark size, mark shape); drawn in this order, last on top
    "training": (GREY, 18, "circle"),
    "held out": ("#9ecae1", 18, "circle"),
    "flipped": (RED, 55, "circle"),
    "proponent": (GREEN, 150, "triangle-up"),
    "opponent": ("#7b3294", 150, "triangle-down"),
    "selected": ("black", 520, "diamond"),
}
FOCUS_ROLES = ("selected", "proponent", "opponent")


def map_domain(points: pd.DataFrame, pad: float = 0.15) -> tuple[list[float], list[float]]:
    """x and y ranges around the selected instance, its proponents and opponents (padded)."""
    focus = points[points["role"].isin(FOCUS_ROLES)]
    if focus.empty:
        focus = points
    domains = []
    for axis in ("x", "y"):
        lo, hi = float(focus[axis].min()), float(focus[axis].max())
        full = float(points[axis].max() - points[axis].min()) or 1.0
        span = max(hi - lo, 0.05 * full)  # never zoom to a single point
        domains.append([lo - pad * span, hi + pad * span])
    return domains[0], domains[1]


def embedding_map(
    points: pd.DataFrame, *, method: str = "umap", zoom: bool = True
) -> alt.LayerChart:
    """A 2-D map of all instances; ``points`` has x, y, role, id, text, label, split.

    One layer per role with a fixed mark size (no size channel), so the selected test
    instance, its proponents and opponents are drawn large and on top of the cloud; one
    legend names every role. ``zoom`` frames the selection and its influencers (points
    outside are clipped), otherwise the whole map; neither forces the axes through zero.
    """
    df = points.copy()
    df["text"] = _short(df["text"])
    roles = list(ROLE_STYLE)
    if zoom:
        xd, yd = map_domain(df)
        xs, ys = (
            alt.Scale(domain=xd, zero=False, nice=False),
            alt.Scale(domain=yd, zero=False, nice=False),
        )
    else:
        xs, ys = alt.Scale(zero=False), alt.Scale(zero=False)
    color = alt.Color(
        "role:N",
        scale=alt.Scale(domain=roles, range=[c for c, _, _ in ROLE_STYLE.values()]),
        title="role",
        legend=alt.Legend(orient="right", symbolSize=120),
    )
    shape = alt.Shape(
        "role:N",
        scale=alt.Scale(domain=roles, range=[m for _, _, m in ROLE_STYLE.values()]),
        title="role",
    )
    base = alt.Chart(df).encode(
        x=alt.X("x:Q", title=f"{method.upper()} 1", axis=alt.Axis(labels=False), scale=xs),
        y=alt.Y("y:Q", title=f"{method.upper()} 2", axis=alt.Axis(labels=False), scale=ys),
        color=color,
        shape=shape,
        tooltip=["id:Q", "role:N", "split:N", "label:N", "flipped:N", "text:N"],
    )
    layers = [
        base.transform_filter(alt.datum.role == role).mark_point(
            filled=True,
            size=size,
            opacity=0.55 if role in ("training", "held out") else 0.95,
            clip=True,
            **({"stroke": "white", "strokeWidth": 1} if role in FOCUS_ROLES else {}),
        )
        for role, (_, size, _) in ROLE_STYLE.items()
    ]
    chart = alt.layer(*layers).properties(height=460)
    return _tag(chart, "embedding_map")


def accuracy_chart(acc: pd.DataFrame) -> alt.Chart:
    """Accuracy per epoch, one line per split."""
    chart = (
        alt.Chart(acc)
        .mark_line(point=True)
        .encode(
            x=alt.X("epoch:O", title="epoch"),
            y=alt.Y("accuracy:Q", scale=alt.Scale(zero=False), title="accuracy"),
            color=alt.Color("split:N", title=None),
            tooltip=["epoch:O", "split:N", alt.Tooltip("accuracy:Q", format=".3f")],
        )
        .properties(height=220)
    )
    return _tag(chart, "accuracy")


def teaching_curve(df: pd.DataFrame, title: str) -> alt.LayerChart:
    """A small synthetic curve (compute.synthetic_curve) with its two lines, for the home page."""
    from core.analysis.shapes import classify
    from ui.compute import line_rows

    cls = classify(df["score"].to_numpy())
    lines = line_rows({k: float(cls[k][0]) for k in ("a_reg", "b_reg", "a_end", "b_end")}, len(df))
    chart = curve_chart(df, lines, title=title, height=180, score_title="score", rank_title="rank")
    # The legend is the text around these charts; without it the three fit side by side.
    chart = chart.configure_legend(disable=True)
    return _tag(chart, "teaching")


def sweep_chart(
    sweep: pd.DataFrame,
    value: str,
    *,
    title: str,
    x: str = "flip_rate",
    threshold: float | None = None,
) -> alt.LayerChart:
    """Fig. 4/5: one thin line per seed, the mean bold with a min–max band, threshold marked."""
    xtitle = "flip rate" if x == "flip_rate" else "number of flipped labels"
    xfmt = ".1%" if x == "flip_rate" else "d"
    df = (
        sweep[[x, "seed", value]].copy()
        if x in sweep
        else sweep[["flip_rate", "seed", value]].copy()
    )
    df["seed"] = df["seed"].astype(str)
    summary = df.groupby(x)[value].agg(["mean", "min", "max"]).reset_index()
    enc_x = alt.X(f"{x}:Q", title=xtitle, axis=alt.Axis(format=xfmt))
    seeds = (
        alt.Chart(df)
        .mark_line(strokeWidth=1, opacity=0.5, point=alt.OverlayMarkDef(size=20))
        .encode(
            x=enc_x,
            y=alt.Y(f"{value}:Q", title=title, scale=alt.Scale(zero=False)),
            color=alt.Color("seed:N", title="seed"),
            tooltip=["seed:N", f"{x}:Q", alt.Tooltip(f"{value}:Q", format=".4f")],
        )
    )
    band = (
        alt.Chart(summary)
        .mark_area(opacity=0.15, color="black")
        .encode(x=enc_x, y="min:Q", y2="max:Q")
    )
    mean = (
        alt.Chart(summary)
        .mark_line(color="black", strokeWidth=3)
        .encode(x=enc_x, y="mean:Q", tooltip=[f"{x}:Q", alt.Tooltip("mean:Q", format=".4f")])
    )
    layers: list[alt.Chart] = [band, seeds, mean]
    if threshold is not None:
        t = alt.Chart(pd.DataFrame({x: [threshold], "label": ["threshold"]}))
        layers.append(t.mark_rule(color=RED, strokeDash=[6, 3], strokeWidth=2).encode(x=enc_x))
        layers.append(
            t.mark_text(align="left", dx=4, dy=-6, color=RED).encode(
                x=enc_x, y=alt.value(8), text="label:N"
            )
        )
    chart = alt.layer(*layers).properties(height=320, title=title)
    return _tag(chart, f"sweep_{value}")


def sweep_epochs_chart(epochs: pd.DataFrame, value: str, title: str) -> alt.Chart:
    """Per-epoch curves of a sweep: one line per (flip rate, seed), coloured by flip rate."""
    df = epochs.copy()
    df["cell"] = df["flip_rate"].astype(str) + " / " + df["seed"].astype(str)
    chart = (
        alt.Chart(df)
        .mark_line(opacity=0.6)
        .encode(
            x=alt.X("epoch:O"),
            y=alt.Y(f"{value}:Q", title=title, scale=alt.Scale(zero=False)),
            color=alt.Color("flip_rate:O", title="flip rate", scale=alt.Scale(scheme="reds")),
            detail="cell:N",
            tooltip=["flip_rate:Q", "seed:Q", "epoch:O", alt.Tooltip(f"{value}:Q", format=".4f")],
        )
        .properties(height=260)
    )
    return _tag(chart, f"sweep_epochs_{value}")


def recall_chart(curves: pd.DataFrame, max_fraction: float = 0.3) -> alt.Chart:
    """Recall of the flips against the fraction of training data inspected, one line per detector."""
    df = curves[curves["fraction"] <= max_fraction + 1e-9]
    chart = (
        alt.Chart(df)
        .mark_line()
        .encode(
            x=alt.X(
                "fraction:Q", title="fraction of training set inspected", axis=alt.Axis(format="%")
            ),
            y=alt.Y(
                "recall:Q",
                title="share of flips found",
                axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1]),
            ),
            color=alt.Color("detector:N"),
            strokeDash=alt.condition(
                alt.datum.detector == "random", alt.value([4, 4]), alt.value([1, 0])
            ),
            tooltip=[
                "detector:N",
                alt.Tooltip("fraction:Q", format=".1%"),
                alt.Tooltip("recall:Q", format=".1%"),
            ],
        )
        .properties(height=340)
    )
    return _tag(chart, "recall")


def cleaning_chart(arms: pd.DataFrame) -> alt.LayerChart:
    """Intervention results (:func:`core.cleaning.interventions.intervention_arms`): each arm's test accuracy
    per action, its mean over seeds as a point and its range as a line."""
    g = arms.copy()
    refs = ["no change", "random", "oracle"]
    detectors = sorted(set(g["arm"]) - set(refs))
    order = {arm: i for i, arm in enumerate([*refs, *detectors])}
    g["setting"] = g["action"] + " (k " + g["k"].astype(str) + ") · " + g["arm"]
    g = g.iloc[np.lexsort((g["arm"].map(order), g["k"], g["action"]))]
    colours = [GREY, RED, GREEN, *[BLUE] * len(detectors)]
    # Points with a min–max range, not bars: accuracies differ by a few points near 0.8-0.9.
    enc_y = alt.Y("setting:N", title=None, sort=list(g["setting"]), axis=alt.Axis(labelLimit=260))
    enc_color = alt.Color(
        "arm:N",
        title="arm",
        scale=alt.Scale(domain=[*refs, *detectors], range=colours),
        legend=alt.Legend(orient="bottom"),
    )
    scale = alt.Scale(zero=False)
    spread = (
        alt.Chart(g)
        .mark_rule(strokeWidth=2)
        .encode(y=enc_y, x=alt.X("min:Q", scale=scale), x2="max:Q", color=enc_color)
    )
    points = (
        alt.Chart(g)
        .mark_point(filled=True, size=110)
        .encode(
            y=enc_y,
            x=alt.X("mean:Q", title="test accuracy (mean over seeds, range)", scale=scale),
            color=enc_color,
            tooltip=[
                "action:N",
                "arm:N",
                alt.Tooltip("seeds:Q"),
                alt.Tooltip("mean:Q", format=".4f"),
                alt.Tooltip("min:Q", format=".4f"),
                alt.Tooltip("max:Q", format=".4f"),
            ],
        )
    )
    # A step per row, not a total height: the legend below would otherwise squeeze the rows
    # until Vega drops every other label.
    chart = alt.layer(spread, points).properties(height=alt.Step(26))
    return _tag(chart, "cleaning")


def panel_chart(
    points: pd.DataFrame,
    lines: pd.DataFrame,
    title: str,
    score_title: str = "TracIn",
    *,
    height: int = 170,
    clip: tuple[float, float] | None = None,
) -> alt.LayerChart:
    """One small-multiple panel: a sorted curve with its two lines, sized by its column
    (``clip``: a robust y range, as in :func:`curve_chart`)."""
    p = points[["rank", "score", "flipped"]].copy()
    p["status"] = np.where(p["flipped"].to_numpy(bool), "flipped", "clean")
    tooltip = [
        alt.Tooltip("rank:Q"),
        alt.Tooltip("score:Q", format=".4g"),
        alt.Tooltip("status:N"),
    ]
    layers = _curve_layers(
        p, lines, tooltip, "rank", score_title, sizes=(36, 10), stroke=1.5, legend=False, clip=clip
    )
    chart = alt.layer(*layers).properties(height=height, title=alt.TitleParams(title, fontSize=12))
    return _tag(_small(chart), "curve_panel")


def index_over_training(series: pd.DataFrame, rule: ShapeRule) -> alt.LayerChart:
    """Bulk S of one test instance per checkpoint (alone and cumulative), with the class bands."""
    lines = (
        alt.Chart(series)
        .mark_line(point=True)
        .encode(
            x=alt.X("checkpoint:O", title="checkpoint (epoch order)"),
            y=alt.Y("s_bulk:Q", title="bulk S"),
            color=alt.Color("scores:N", title=None, legend=alt.Legend(orient="bottom")),
            tooltip=[
                alt.Tooltip("checkpoint:O"),
                alt.Tooltip("scores:N"),
                alt.Tooltip("shape:N"),
                alt.Tooltip("s_bulk:Q", format="+.3f"),
                alt.Tooltip("end_ratio:Q", title="end ratio %", format=".1f"),
            ],
        )
    )
    refs = pd.DataFrame({"y": list(rule.bounds), "class": ["S above", "Z below"]})
    rules = alt.Chart(refs).mark_rule(strokeDash=[4, 4], color=GREY).encode(y="y:Q")
    return _tag(alt.layer(rules, lines).properties(height=240), "index_over_training")


def flip_ranks_over_training(traces: pd.DataFrame, n_train: int, mode: str) -> alt.LayerChart:
    """Rank of every flipped training instance at each checkpoint (one line per instance)."""
    lines = (
        alt.Chart(traces)
        .mark_line(
            point=alt.OverlayMarkDef(color=RED, size=18), color=RED, opacity=0.45, strokeWidth=1
        )
        .encode(
            x=alt.X("checkpoint:O", title="checkpoint (epoch order)"),
            y=alt.Y(
                "rank:Q",
                title=["rank of each flip", f"(0 … {n_train - 1})"],  # two lines: see _curve_layers
                scale=alt.Scale(domain=[0, n_train - 1], reverse=True),
            ),
            detail="train_id:N",
            tooltip=[
                alt.Tooltip("train_id:Q", title="training id"),
                alt.Tooltip("checkpoint:O"),
                alt.Tooltip("rank:Q"),
                alt.Tooltip("from_centre:Q", title="distance from centre %", format=".0f"),
            ],
        )
    )
    centre = (
        alt.Chart(pd.DataFrame({"y": [(n_train - 1) / 2]}))
        .mark_rule(strokeDash=[2, 2], color=GREY)
        .encode(y="y:Q")
    )
    return _tag(alt.layer(centre, lines).properties(height=240, title=mode), "flip_ranks")


def sensitivity_chart(rows: pd.DataFrame, threshold: str) -> alt.LayerChart:
    """Class counts as one threshold moves (stacked bars), the value in force marked."""
    long = rows.melt(
        id_vars=["value", "default"],
        value_vars=[c for c in SHAPE_COLORS if c in rows],
        var_name="shape",
        value_name="count",
    )
    bars = (
        alt.Chart(long)
        .mark_bar()
        .encode(
            x=alt.X("value:O", title=threshold),
            y=alt.Y("count:Q", title="test instances"),
            color=alt.Color("shape:N", scale=_shape_scale(), title="shape"),
            tooltip=["value:O", "shape:N", "count:Q"],
        )
    )
    mark = (
        alt.Chart(rows[rows["default"]])
        .mark_text(dy=-8, text="in force")
        .encode(x=alt.X("value:O"), y=alt.value(0))
    )
    return _tag(alt.layer(bars, mark).properties(height=160), f"sensitivity_{threshold}")


def reference_curve_chart(curve: pd.DataFrame, title: str) -> alt.Chart:
    """One synthetic calibration reference, standardised, as a small panel sized by its column
    (one chart per panel in st.columns: a faceted grid does not reflow on a phone)."""
    chart = (
        alt.Chart(curve[["rank", "score"]])
        .mark_line(color=BLUE)
        .encode(
            x=alt.X("rank:Q", title="rank"),
            # no y title: the text above the panels says the scores are standardised
            y=alt.Y("score:Q", title=None),
        )
        .properties(height=140, title=alt.TitleParams(title, fontSize=12))
    )
    return _tag(_small(chart), "reference_curves")


VERDICT_COLORS = {
    "holds": "#1a9641",
    "contradicted": "#d7191c",
    "inconclusive": "#fdae61",
    "not testable": "#d9d9d9",
}


def verdict_grid(cells: pd.DataFrame, select_name: str = "cell") -> alt.LayerChart:
    """Claims × conditions, coloured by verdict, statistic printed, interval and reason on hover.

    ``cells``: condition, claim, verdict, label (text in the cell), statement, ci, n, view, why.
    Clicking a cell selects (condition, claim).
    """
    pick = alt.selection_point(name=select_name, fields=["condition", "claim"], on="click")
    order = list(dict.fromkeys(cells["condition"]))
    base = alt.Chart(cells).encode(
        x=alt.X("claim:N", title=None, axis=alt.Axis(orient="top", labelAngle=0)),
        y=alt.Y("condition:N", title=None, sort=order),
    )
    tooltip = [
        alt.Tooltip("condition:N"),
        alt.Tooltip("claim:N"),
        alt.Tooltip("statement:N"),
        alt.Tooltip("verdict:N"),
        alt.Tooltip("label:N", title="statistic"),
        alt.Tooltip("ci:N", title="95 % interval"),
        alt.Tooltip("n:Q"),
        alt.Tooltip("view:N"),
        alt.Tooltip("why:N"),
    ]
    rects = base.mark_rect(stroke="white", strokeWidth=2).encode(
        color=alt.Color(
            "verdict:N",
            scale=alt.Scale(domain=list(VERDICT_COLORS), range=list(VERDICT_COLORS.values())),
            legend=alt.Legend(orient="bottom", title=None),
        ),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.55)),
        tooltip=tooltip,
    )
    text = base.mark_text(fontSize=12).encode(text="label:N", tooltip=tooltip)
    chart = alt.layer(rects.add_params(pick), text).properties(height=34 * len(order) + 40)
    return _tag(chart, "verdict_grid")


def evidence_curves(curve: pd.DataFrame, title: str) -> alt.Chart:
    """One misclassified instance's sorted curve, flips red, sized by its column (small multiple).

    ``curve``: rank, score, flipped (downsampled, every flip kept).
    """
    df = curve[["rank", "score", "flipped"]].copy()
    df["status"] = np.where(df["flipped"].to_numpy(bool), "flipped", "clean")
    chart = (
        alt.Chart(df)
        .mark_circle(opacity=0.85)
        .encode(
            x=alt.X("rank:Q", title="rank"),
            y=alt.Y("score:Q", title="TracIn", axis=alt.Axis(format="~s")),
            color=alt.Color(
                "status:N",
                scale=alt.Scale(domain=["clean", "flipped"], range=[BLUE, RED]),
                legend=None,
            ),
            size=alt.condition(alt.datum.flipped, alt.value(30), alt.value(8)),
            order=alt.Order("flipped:Q"),
            tooltip=[alt.Tooltip("rank:Q"), alt.Tooltip("score:Q", format=".4g"), "status:N"],
        )
        .properties(height=150, title=alt.TitleParams(title, fontSize=11, anchor="start"))
    )
    return _tag(chart, "evidence_curves")


def threshold_fit_chart(cells: pd.DataFrame, fit: dict) -> alt.LayerChart:
    """Sweep accuracy per seed against flip rate, with the hinge fit of claim C7."""
    lo, hi = float(cells["flip_rate"].min()), float(cells["flip_rate"].max())
    xs = np.linspace(lo, hi, 101)
    line = pd.DataFrame(
        {
            "flip_rate": xs,
            "fit": fit["plateau"] - fit["drop_per_rate"] * np.maximum(xs - fit["breakpoint"], 0),
        }
    )
    points = (
        alt.Chart(cells)
        .mark_circle(size=60, opacity=0.8)
        .encode(
            x=alt.X("flip_rate:Q", title="flip rate", axis=alt.Axis(format="%")),
            y=alt.Y("final_test_accuracy:Q", title="test accuracy", scale=alt.Scale(zero=False)),
            color=alt.Color("seed:N", title="seed"),
            tooltip=["flip_rate:Q", "seed:N", alt.Tooltip("final_test_accuracy:Q", format=".3f")],
        )
    )
    fitted = alt.Chart(line).mark_line(color="black").encode(x="flip_rate:Q", y="fit:Q")
    rule = (
        alt.Chart(pd.DataFrame({"b": [fit["breakpoint"]]}))
        .mark_rule(strokeDash=[4, 4], color=GREY)
        .encode(x="b:Q")
    )
    return _tag(alt.layer(points, fitted, rule).properties(height=320), "threshold_fit")


def regime_chart(rows: pd.DataFrame) -> alt.Chart:
    """Share of Z and S curves among the misclassified against the loss still unfitted."""
    long = rows.melt(
        id_vars=["condition", "train_loss"], value_vars=["S", "backslash", "Z"], var_name="shape"
    )
    chart = (
        alt.Chart(long)
        .mark_point(size=90, filled=True)
        .encode(
            x=alt.X("train_loss:Q", title="mean training loss at the view's last checkpoint"),
            y=alt.Y("value:Q", title="share of misclassified curves", axis=alt.Axis(format="%")),
            color=alt.Color("shape:N", scale=_shape_scale()),
            tooltip=[
                "condition:N",
                "shape:N",
                alt.Tooltip("value:Q", format=".0%"),
                alt.Tooltip("train_loss:Q", format=".3f"),
            ],  # fmt: skip
        )
        .properties(height=300)
    )
    return _tag(chart, "regime_chart")


def checkpoint_terms_chart(terms: pd.DataFrame) -> alt.Chart:
    """One training instance's TracIn terms per checkpoint (bars); those ``in view`` are summed."""
    chart = (
        alt.Chart(terms)
        .mark_bar()
        .encode(
            x=alt.X("checkpoint:O", title="checkpoint (epoch)"),
            y=alt.Y("term:Q", title="η · gradient dot product"),
            color=alt.condition(alt.datum.term >= 0, alt.value(BLUE), alt.value(RED)),
            # Checkpoints outside the view stay visible but faded: the score leaves them out.
            opacity=alt.condition(alt.datum["in view"], alt.value(1.0), alt.value(0.3)),
            tooltip=[
                "checkpoint:O",
                alt.Tooltip("term:Q", format=".4g"),
                alt.Tooltip("in view:N", title="summed in this view"),
            ],
        )
        .properties(height=220)
    )
    return _tag(chart, "checkpoint_terms")
