// The top-k cards (TopKCards in topk_view.py): plain ES module, served as a file so that the
// browser imports it as is (an inline _esm is run through sucrase once per component, ~30 ms).
function card(c, rank) {
  const item = document.createElement('div');
  item.className = 'topk-item';
  Object.assign(item.dataset, {rank: String(rank), image: String(c.image), y: String(c.y),
                               x: String(c.x), score: c.score.toFixed(6)});
  const img = document.createElement('img');
  img.src = c.src; img.width = 96; img.height = 96;
  img.alt = `image ${c.image} patch ${c.y},${c.x}`;
  const caption = document.createElement('div');
  const score = document.createElement('b');
  score.textContent = c.score.toFixed(3);
  caption.append(score, ` #${c.image} (${c.y},${c.x})`, document.createElement('br'), c.label);
  for (const line of (c.extra || [])) caption.append(document.createElement('br'), line);  // text nodes: no HTML
  const open = document.createElement('button');
  open.type = 'button';
  open.className = 'topk-open';
  open.textContent = `open #${c.image}`;
  item.append(img, caption, open);
  return item;
}

export function render({ model, el }) {
  const box = document.createElement('div');
  box.className = 'topk-panel';
  const draw = () => box.replaceChildren(...JSON.parse(model.payload).map(card));
  box.addEventListener('click', (ev) => {
    const button = ev.target.closest('button.topk-open');
    if (button) model.send_msg({open: Number(button.parentElement.dataset.image)});
  });
  draw();
  model.on('payload', draw);
  el.append(box);
}
