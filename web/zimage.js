// comfyui-zimage in the graph editor: a node's preset combo fills in the widgets it governs.
//
// ZImageSampler's `preset` writes steps, cfg, shift, cfg_normalization and cfg_truncation; ZImageLatent's
// `aspect` writes width and height. The values come from the node's own definition (the combo's "presets" or
// "sizes" option, from nodes/sampler.py and nodes/latent.py), and the node always runs with the widgets'
// values: what the user sees is what runs. Changing a governed widget by hand turns the combo to "custom", and a
// saved workflow whose widgets differ from its combo opens showing "custom".
import { app } from "../../scripts/app.js";

const FILLERS = {
  ZImageSampler: { combo: "preset", table: "presets" },
  ZImageLatent: { combo: "aspect", table: "sizes" },
};

app.registerExtension({
  name: "comfyui-zimage.presets",
  beforeRegisterNodeDef(nodeType, nodeData) {
    const filler = FILLERS[nodeData.name];
    if (!filler) return;
    const table = nodeData.input?.required?.[filler.combo]?.[1]?.[filler.table] ?? {};
    // choice -> {widget name: value}; an [width, height] pair for the latent's sizes; null for "custom"
    const valuesOf = (choice) => {
      const values = table[choice];
      if (!values) return null;
      return Array.isArray(values) ? { width: values[0], height: values[1] } : values;
    };
    const widget = (node, name) => node.widgets?.find((w) => w.name === name);
    const differs = (node, values) => Object.entries(values).some(([name, v]) => widget(node, name)?.value !== v);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const combo = widget(this, filler.combo);
      if (!combo) return result;
      let filling = false;
      const comboCallback = combo.callback;
      combo.callback = (value, ...rest) => {
        const values = valuesOf(value);
        if (values) {
          filling = true;
          for (const [name, v] of Object.entries(values)) {
            const w = widget(this, name);
            if (w) {
              w.value = v;
              w.callback?.(v);
            }
          }
          filling = false;
          this.setDirtyCanvas?.(true, true);
        }
        return comboCallback?.call(combo, value, ...rest);
      };
      const governed = new Set(Object.keys(table).flatMap((choice) => Object.keys(valuesOf(choice) ?? {})));
      for (const name of governed) {
        const w = widget(this, name);
        if (!w) continue;
        const callback = w.callback;
        w.callback = (value, ...rest) => {
          const result = callback?.call(w, value, ...rest);
          const values = valuesOf(combo.value);
          if (!filling && values && differs(this, values)) combo.value = "custom";
          return result;
        };
      }
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      const combo = widget(this, filler.combo);
      const values = combo && valuesOf(combo.value);
      if (values && differs(this, values)) combo.value = "custom";
      return result;
    };
  },
});
