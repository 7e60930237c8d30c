// A 2D vector face driven by the 52 ARKit weights, drawn into an SVG.
//
// The face looks at the viewer, so its left side (eyeBlinkLeft,
// mouthSmileLeft) is on the viewer's right. Every shape is computed from the
// weights by plain arithmetic in faceGeometry(); drawFace() only writes it
// into the SVG. A wrong animation should look wrong: the jaw drops with
// jawOpen, lips part, round (funnel, pucker), widen (stretch, smile), thin
// (press, roll), corners rise and fall (smile, frown), eyes close, widen,
// squint and look around, brows rise and knit, cheeks puff.

const SVG = "http://www.w3.org/2000/svg";

export function channelIndex(names) {
  const index = {};
  names.forEach((name, i) => { index[name] = i; });
  return index;
}

// Geometry of one frame, in the SVG's units (viewBox 0 0 400 480).
export function faceGeometry(weights, index) {
  const w = (name) => Math.max(-0.5, Math.min(1.5, weights[index[name]] ?? 0));
  const pair = (stem) => [w(stem + "Right"), w(stem + "Left")]; // viewer's left, right
  const g = {};

  // Jaw and mouth.
  const jaw = w("jawOpen");
  const jawDrop = 62 * jaw;
  const jawSide = 14 * (w("jawLeft") - w("jawRight"));
  const funnel = w("mouthFunnel"), pucker = w("mouthPucker"), close = w("mouthClose");
  const [smileR, smileL] = pair("mouthSmile"), [frownR, frownL] = pair("mouthFrown");
  const [stretchR, stretchL] = pair("mouthStretch"), [pressR, pressL] = pair("mouthPress");
  const [dimpleR, dimpleL] = pair("mouthDimple");
  const [upR, upL] = pair("mouthUpperUp"), [downR, downL] = pair("mouthLowerDown");
  const rollLower = w("mouthRollLower"), rollUpper = w("mouthRollUpper");
  const shift = 16 * (w("mouthLeft") - w("mouthRight")) + jawSide * 0.6;
  const cx = 200 + shift, cy = 338 + jawDrop * 0.25;
  const halfWidth = 44 * (1 - 0.45 * pucker - 0.3 * funnel) + 10 * (stretchL + stretchR) / 2 + 7 * (smileL + smileR) / 2;
  const cornerLift = (smile, frown, dimple) => -16 * smile + 14 * frown - 4 * dimple;
  g.cornerLeft = { x: cx - halfWidth - 5 * stretchR - 3 * dimpleR, y: cy + cornerLift(smileR, frownR, dimpleR) };
  g.cornerRight = { x: cx + halfWidth + 5 * stretchL + 3 * dimpleL, y: cy + cornerLift(smileL, frownL, dimpleL) };
  // The lips part with the jaw unless mouthClose holds them; rounding (funnel)
  // and raised/lowered lips open them without the jaw.
  const lipGap = Math.max(0, jawDrop * (1 - Math.min(1, close)) + 9 * (upL + upR + downL + downR) / 2 + 12 * funnel
    - 4 * (pressL + pressR) / 2);
  const cornersMid = (g.cornerLeft.y + g.cornerRight.y) / 2;
  g.upperInner = cornersMid - lipGap * 0.3 - 5 * (upL + upR) / 2 + 3 * w("mouthShrugUpper");
  g.lowerInner = cornersMid + lipGap * 0.7 + 5 * (downL + downR) / 2 - 3 * w("mouthShrugLower");
  const thin = (press, roll) => 10 * (1 - 0.55 * press) * (1 - 0.65 * roll) + 5 * pucker + 3 * funnel;
  g.upperLip = thin((pressL + pressR) / 2, rollUpper);
  g.lowerLip = thin((pressL + pressR) / 2, rollLower) + 2;
  g.mouthCenter = cx;
  g.mouthOpening = g.lowerInner - g.upperInner; // what the test compares with jawOpen
  g.tongue = w("tongueOut");

  // Chin follows the jaw.
  g.chinY = 430 + jawDrop * 0.75;
  g.chinX = 200 + jawSide;

  // Cheeks.
  const puff = w("cheekPuff");
  const [squintCheekR, squintCheekL] = pair("cheekSquint");
  g.cheeks = [
    { x: 112 - 8 * puff, y: 318 - 10 * squintCheekR, r: 20 + 16 * puff, o: 0.15 + 0.45 * puff + 0.3 * squintCheekR },
    { x: 288 + 8 * puff, y: 318 - 10 * squintCheekL, r: 20 + 16 * puff, o: 0.15 + 0.45 * puff + 0.3 * squintCheekL },
  ];

  // Eyes: [viewer's left = the face's right, viewer's right = the face's left].
  g.eyes = ["Right", "Left"].map((side, k) => {
    const blink = w("eyeBlink" + side), wide = w("eyeWide" + side), squint = w("eyeSquint" + side);
    const open = Math.max(0, 15 * (1 - Math.min(1, blink)) * (1 - 0.45 * squint) * (1 + 0.5 * wide));
    const outward = k === 0 ? -1 : 1; // towards the viewer's edge
    const look = 7 * (w("eyeLookOut" + side) - w("eyeLookIn" + side)) * outward;
    return {
      x: k === 0 ? 145 : 255, y: 222,
      open,
      pupilX: look, pupilY: 6 * (w("eyeLookDown" + side) - w("eyeLookUp" + side)),
      lowerLid: 4 * squint + 3 * (k === 0 ? squintCheekR : squintCheekL),
    };
  });

  // Brows: inner and outer ends.
  const inner = w("browInnerUp");
  g.brows = ["Right", "Left"].map((side, k) => {
    const down = w("browDown" + side), outer = w("browOuterUp" + side);
    const x0 = k === 0 ? 170 : 230, x1 = k === 0 ? 112 : 288;
    return {
      inner: { x: x0 + (k === 0 ? 6 : -6) * down, y: 188 - 16 * inner + 14 * down },
      outer: { x: x1, y: 186 - 16 * outer + 6 * down },
    };
  });

  // Nose wings rise with a sneer.
  g.nose = [w("noseSneerRight"), w("noseSneerLeft")].map((s, k) => ({ x: k === 0 ? 184 : 216, y: 292 - 8 * s }));
  return g;
}

function el(parent, tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  parent.appendChild(node);
  return node;
}

// Builds the face's elements once; returns a function that draws a frame.
export function createFace(svg) {
  svg.setAttribute("viewBox", "0 0 400 480");
  svg.innerHTML = "";
  const parts = {};
  parts.head = el(svg, "path", { class: "skin", id: "head" });
  parts.cheeks = [0, 1].map(() => el(svg, "circle", { class: "cheek" }));
  parts.eyes = [0, 1].map(() => {
    const white = el(svg, "path", { class: "eye-white" });
    const pupil = el(svg, "circle", { class: "pupil", r: 7 });
    const lid = el(svg, "path", { class: "lid" });
    return { white, pupil, lid };
  });
  parts.brows = [0, 1].map(() => el(svg, "path", { class: "brow" }));
  parts.nose = el(svg, "path", { class: "nose" });
  parts.mouthInner = el(svg, "path", { class: "mouth-inner", id: "mouth-inner" });
  parts.tongue = el(svg, "ellipse", { class: "tongue" });
  parts.upperLip = el(svg, "path", { class: "lip", id: "upper-lip" });
  parts.lowerLip = el(svg, "path", { class: "lip", id: "lower-lip" });

  // A quadratic curve through (x0,y0), a middle point at (xm, ym), and (x1,y1).
  const through = (a, xm, ym, b) => `Q ${xm} ${2 * ym - (a.y + b.y) / 2} ${b.x} ${b.y}`;

  return function draw(weights, index) {
    const g = faceGeometry(weights, index);
    parts.head.setAttribute("d",
      `M 200 40 C 300 40 340 120 336 230 C 334 330 ${g.chinX + 70} ${g.chinY} ${g.chinX} ${g.chinY} ` +
      `C ${g.chinX - 70} ${g.chinY} 66 330 64 230 C 60 120 100 40 200 40 Z`);
    g.cheeks.forEach((c, k) => {
      parts.cheeks[k].setAttribute("cx", c.x); parts.cheeks[k].setAttribute("cy", c.y);
      parts.cheeks[k].setAttribute("r", c.r); parts.cheeks[k].setAttribute("opacity", Math.min(1, c.o).toFixed(3));
    });
    g.eyes.forEach((e, k) => {
      const left = { x: e.x - 26, y: e.y }, right = { x: e.x + 26, y: e.y };
      const top = e.y - e.open, bottom = e.y + Math.max(0.5, e.open * 0.6) - e.lowerLid;
      parts.eyes[k].white.setAttribute("d", `M ${left.x} ${left.y} ${through(left, e.x, top, right)} ${through(right, e.x, bottom, left)} Z`);
      parts.eyes[k].pupil.setAttribute("cx", e.x + e.pupilX);
      parts.eyes[k].pupil.setAttribute("cy", e.y + e.pupilY);
      parts.eyes[k].pupil.setAttribute("r", Math.max(0, Math.min(7, e.open * 0.6)));
      parts.eyes[k].lid.setAttribute("d", `M ${left.x - 2} ${left.y} ${through(left, e.x, top - 2, right)}`);
    });
    g.brows.forEach((b, k) => {
      const mx = (b.inner.x + b.outer.x) / 2, my = Math.min(b.inner.y, b.outer.y) - 8;
      parts.brows[k].setAttribute("d", `M ${b.inner.x} ${b.inner.y} Q ${mx} ${my} ${b.outer.x} ${b.outer.y}`);
    });
    parts.nose.setAttribute("d", `M 200 240 L 196 282 Q ${g.nose[0].x} ${g.nose[0].y + 12} ${g.nose[0].x - 8} ${g.nose[0].y} ` +
      `M 204 282 Q ${g.nose[1].x} ${g.nose[1].y + 12} ${g.nose[1].x + 8} ${g.nose[1].y}`);
    const L = g.cornerLeft, R = g.cornerRight, m = g.mouthCenter;
    parts.mouthInner.setAttribute("d", `M ${L.x} ${L.y} ${through(L, m, g.upperInner, R)} ${through(R, m, g.lowerInner, L)} Z`);
    parts.upperLip.setAttribute("d",
      `M ${L.x} ${L.y} ${through(L, m, g.upperInner - g.upperLip, R)} ${through(R, m, g.upperInner, L)} Z`);
    parts.lowerLip.setAttribute("d",
      `M ${L.x} ${L.y} ${through(L, m, g.lowerInner, R)} ${through(R, m, g.lowerInner + g.lowerLip, L)} Z`);
    const tongueOut = g.tongue > 0.05 && g.mouthOpening > 4;
    parts.tongue.setAttribute("cx", m);
    parts.tongue.setAttribute("cy", g.lowerInner - 2 + 10 * g.tongue);
    parts.tongue.setAttribute("rx", tongueOut ? 14 : 0);
    parts.tongue.setAttribute("ry", tongueOut ? 6 + 8 * g.tongue : 0);
    return g;
  };
}
