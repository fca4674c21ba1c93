// D3PO Studio: the D3PO Pick node shows the round's images and posts the click back.
// The Python side (nodes/round_nodes.py) registers its wait, sends "d3po.pick" {node, round,
// images} and waits on POST /d3po/pick {node_id, index | none | cancel}. GET /d3po/pick lists
// picks still waiting: the page shows them again whenever a graph is loaded (after a reload the
// graph is restored after setup(), so setup() alone would find no node to show them in).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "D3POPick";
const PANEL = "d3poPanel"; // the node's picker panel, kept on the node (its id may change on load)

function imageUrl(ref) {
  const q = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder, type: ref.type });
  return api.apiURL(`/view?${q}`);
}

async function answer(node, body) {
  const panel = node[PANEL];
  const res = await api.fetchApi("/d3po/pick", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ node_id: String(node.id), ...body }),
  });
  panel.status.textContent = res.ok ? "sent" : `not sent: ${(await res.json()).error}`;
  if (res.ok) panel.grid.replaceChildren();
}

function makePanel(node) {
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%";
  const grid = document.createElement("div");
  grid.style.cssText = "display:flex;flex-wrap:wrap;gap:4px";
  const bar = document.createElement("div");
  bar.style.cssText = "display:flex;gap:4px;align-items:center";
  const none = document.createElement("button");
  none.textContent = "None is better";
  none.title = "Log that no image is better; nothing is trained";
  none.onclick = () => answer(node, { none: true });
  const cancel = document.createElement("button");
  cancel.textContent = "Cancel";
  cancel.title = "Stop this run without an update";
  cancel.onclick = () => answer(node, { cancel: true });
  const status = document.createElement("span");
  status.style.cssText = "font-size:11px;opacity:0.8";
  status.textContent = "waiting for a round";
  bar.append(none, cancel, status);
  root.append(grid, bar);
  node.addDOMWidget("d3po_pick", "d3po_pick", root, { serialize: false });
  node[PANEL] = { root, grid, status };
  return node[PANEL];
}

function show(detail) {
  const node = app.graph?.getNodeById(Number(detail.node));
  if (node?.comfyClass !== NODE_TYPE) return; // not in this graph (ids are per graph)
  const panel = node[PANEL] ?? makePanel(node);
  panel.grid.replaceChildren(
    ...detail.images.map((ref, i) => {
      const img = document.createElement("img");
      img.src = imageUrl(ref);
      img.title = `Pick image ${i}`;
      img.style.cssText =
        "width:calc(50% - 4px);max-height:240px;object-fit:contain;cursor:pointer;" +
        "image-rendering:pixelated;border:2px solid transparent";
      img.onmouseenter = () => (img.style.borderColor = "#6cf");
      img.onmouseleave = () => (img.style.borderColor = "transparent");
      img.onclick = () => answer(node, { index: i });
      return img;
    })
  );
  panel.status.textContent = "click the image you prefer";
  const [w, h] = node.computeSize?.() ?? node.size;
  node.setSize?.([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas?.(true, true);
}

async function showWaiting() {
  const res = await api.fetchApi("/d3po/pick");
  if (!res.ok) return;
  for (const [node, info] of Object.entries(await res.json())) show({ node, ...info });
}

function clearAll(text) {
  for (const node of app.graph?._nodes ?? []) {
    if (!node[PANEL]) continue;
    node[PANEL].grid.replaceChildren();
    node[PANEL].status.textContent = text;
  }
}

app.registerExtension({
  name: "d3po.studio.pick",
  async setup() {
    api.addEventListener("d3po.pick", ({ detail }) => show(detail));
    api.addEventListener("execution_interrupted", () => clearAll("interrupted"));
    api.addEventListener("execution_error", () => clearAll("stopped by an error"));
    await showWaiting(); // a graph may already be loaded
  },
  async afterConfigureGraph() {
    await showWaiting(); // the graph restored after a page reload, or a workflow loaded later
  },
  async nodeCreated(node) {
    if (node.comfyClass === NODE_TYPE) makePanel(node);
  },
});
