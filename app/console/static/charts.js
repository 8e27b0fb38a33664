// Small SVG line charts for the console: no library, no network, text only through textContent.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_W = 260, CHART_H = 80, PAD = 4;

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function fmtNum(v) {
  if (v === null || v === undefined || !isFinite(v)) return "-";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1000) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  return v.toFixed(3);
}

// lineChart(title, unit, series, opts): series = [{label, color, points: [[t, v], ...]}]
// opts.min / opts.max fix the y range (e.g. 0..100 for percents); otherwise it fits the data.
function lineChart(title, unit, series, opts) {
  opts = opts || {};
  const box = document.createElement("div");
  box.className = "chart";
  const head = document.createElement("div");
  head.className = "title";
  const name = document.createElement("span");
  name.textContent = title;
  const last = document.createElement("span");
  const lastValues = series.map(s => s.points.length ? s.points[s.points.length - 1][1] : null);
  last.textContent = lastValues.map(v => fmtNum(v)).join(" / ") + (unit ? " " + unit : "");
  head.append(name, last);
  const svg = svgEl("svg", { viewBox: `0 0 ${CHART_W} ${CHART_H}`, role: "img" });
  const label = svgEl("title");
  label.textContent = title;
  svg.appendChild(label);
  const all = series.flatMap(s => s.points).filter(p => p[1] !== null && isFinite(p[1]));
  if (all.length) {
    const t0 = Math.min(...all.map(p => p[0])), t1 = Math.max(...all.map(p => p[0]));
    let lo = opts.min !== undefined ? opts.min : Math.min(...all.map(p => p[1]));
    let hi = opts.max !== undefined ? opts.max : Math.max(...all.map(p => p[1]));
    if (opts.min === undefined) lo = Math.min(lo, 0);
    if (hi <= lo) hi = lo + 1;
    const x = t => PAD + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (CHART_W - 2 * PAD);
    const y = v => CHART_H - PAD - (Math.min(Math.max(v, lo), hi) - lo) / (hi - lo) * (CHART_H - 2 * PAD);
    if (lo < 0 && hi > 0) svg.appendChild(svgEl("line", { x1: 0, x2: CHART_W, y1: y(0), y2: y(0), stroke: "#c4cad6", "stroke-dasharray": "3 3" }));
    for (const s of series) {
      const pts = s.points.filter(p => p[1] !== null && isFinite(p[1]));
      if (!pts.length) continue;
      const d = pts.map(p => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
      svg.appendChild(svgEl("polyline", { points: d, fill: "none", stroke: s.color, "stroke-width": 1.6 }));
      const p = pts[pts.length - 1];
      svg.appendChild(svgEl("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.2, fill: s.color }));
    }
    const top = svgEl("text", { x: CHART_W - PAD, y: 11, "text-anchor": "end", "font-size": 9, fill: "#8a93a6" });
    top.textContent = fmtNum(hi);
    const bottom = svgEl("text", { x: CHART_W - PAD, y: CHART_H - 6, "text-anchor": "end", "font-size": 9, fill: "#8a93a6" });
    bottom.textContent = fmtNum(lo);
    svg.append(top, bottom);
  } else {
    const none = svgEl("text", { x: CHART_W / 2, y: CHART_H / 2, "text-anchor": "middle", "font-size": 11, fill: "#8a93a6" });
    none.textContent = "no data yet";
    svg.appendChild(none);
  }
  box.append(head, svg);
  if (series.length > 1) {
    const legend = document.createElement("div");
    legend.className = "legend";
    for (const s of series) {
      const item = document.createElement("span");
      item.textContent = "\u25A0 " + s.label;
      item.style.color = s.color;
      legend.appendChild(item);
    }
    box.appendChild(legend);
  }
  return box;
}

window.lineChart = lineChart;
window.fmtNum = fmtNum;
