// The curves of the main channels over time, with a playhead, and the heat
// map of all 52 channels (one row each, time to the right).

export const MAIN_CHANNELS = [
  ["jawOpen", "#d9480f"],
  ["mouthClose", "#5c940d"],
  ["mouthFunnel", "#1971c2"],
  ["mouthPucker", "#7048e8"],
  ["mouthSmileLeft", "#e8590c"],
  ["mouthPressLeft", "#495057"],
  ["eyeBlinkLeft", "#0c8599"],
  ["browInnerUp", "#c2255c"],
];

function fit(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return [ctx, w, h];
}

// frames: array of weight arrays (holes allowed while streaming); fps 30.
export function drawCurves(canvas, frames, index, playhead, seconds) {
  const [ctx, w, h] = fit(canvas);
  ctx.clearRect(0, 0, w, h);
  const span = Math.max(seconds, frames.length / 30, 1);
  const x = (t) => (t / span) * (w - 8) + 4;
  const y = (v) => h - 14 - Math.max(0, Math.min(1, v)) * (h - 24);
  ctx.strokeStyle = "#dee2e6";
  ctx.lineWidth = 1;
  for (let s = 0; s <= span; s += 1) {
    ctx.beginPath(); ctx.moveTo(x(s), 4); ctx.lineTo(x(s), h - 14); ctx.stroke();
    ctx.fillStyle = "#868e96"; ctx.font = "10px sans-serif"; ctx.fillText(`${s}s`, x(s) + 2, h - 3);
  }
  for (const [name, colour] of MAIN_CHANNELS) {
    const c = index[name];
    if (c === undefined) continue;
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    frames.forEach((f, k) => {
      if (!f) { pen = false; return; }
      if (pen) ctx.lineTo(x(k / 30), y(f[c])); else ctx.moveTo(x(k / 30), y(f[c]));
      pen = true;
    });
    ctx.stroke();
  }
  if (playhead !== null) {
    ctx.strokeStyle = "#212529";
    ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(x(playhead), 0); ctx.lineTo(x(playhead), h - 14); ctx.stroke();
  }
}

function heat(v) {
  // white (0) -> orange -> dark red (1)
  const t = Math.max(0, Math.min(1, v));
  const r = 255 - 120 * Math.max(0, t - 0.5) * 2;
  const g = 255 - 230 * t;
  const b = 255 - 255 * Math.min(1, t * 1.6);
  return `rgb(${r | 0},${g | 0},${b | 0})`;
}

export function drawHeatmap(canvas, frames, names, playhead, seconds) {
  const [ctx, w, h] = fit(canvas);
  ctx.clearRect(0, 0, w, h);
  const span = Math.max(seconds, frames.length / 30, 1);
  const rows = names.length || 52;
  const rowH = h / rows;
  const colW = Math.max(1, (w / (span * 30)));
  frames.forEach((f, k) => {
    if (!f) return;
    const x0 = (k / 30 / span) * w;
    for (let c = 0; c < rows; c++) {
      ctx.fillStyle = heat(f[c]);
      ctx.fillRect(x0, c * rowH, colW + 0.5, rowH + 0.5);
    }
  });
  if (playhead !== null) {
    ctx.strokeStyle = "#212529";
    ctx.beginPath(); ctx.moveTo((playhead / span) * w, 0); ctx.lineTo((playhead / span) * w, h); ctx.stroke();
  }
  canvas.title = "52 channels, top to bottom: " + names.join(", ");
}
