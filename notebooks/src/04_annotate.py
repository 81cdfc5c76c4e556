# %% [markdown]
# # 04 · Captions
# Writes a caption file beside every image: **WD1.4 tags** for anime and manga images, **BLIP** sentences for
# general images, or `none` to only clean the captions you already have.
#
# Remove the character's own features (e.g. `long hair, red eyes`) with `undesired_tags` so the model learns them
# as part of the character; the `trigger_word` goes first in every caption. Existing captions are kept unless you
# choose `overwrite` (replace) or `append` (add the new tags after them).

# %% [parameters]
#@title Workspace { display-mode: "form" }
project = "my_lora"  #@param {type:"string"}
workspace_root = ""  #@param {type:"string"}

# %%
from lycolab.colab import open_workspace
ws = open_workspace(project, workspace_root)

# %% [parameters]
#@title Annotate { display-mode: "form" }
method = "wd14"  #@param ["wd14", "blip", "none"]
#@markdown Empty = the default model (WD1.4 ConvNeXtV2 tagger v2, or BLIP large); or a hub repo or local folder.
annotation_model = ""  #@param {type:"string"}
threshold = 0.35  #@param {type:"slider", min:0.05, max:0.95, step:0.05}
undesired_tags = ""  #@param {type:"string"}
trigger_word = ""  #@param {type:"string"}
caption_extension = ".txt"  #@param [".txt", ".caption"]
mode = "skip"  #@param ["skip", "overwrite", "append"]

# %%
from lycolab.steps import annotate
annotated = annotate.annotate(ws, method, annotation_model, threshold, undesired_tags=undesired_tags, trigger_word=trigger_word, caption_extension=caption_extension, mode=mode)

# %%
annotated

# %% [parameters]
#@title Look at the result { display-mode: "form" }
top_tags = 30  #@param {type:"integer"}
images_to_show = 6  #@param {type:"integer"}

# %%
annotate.tag_table(ws, top_tags)

# %%
annotate.caption_browser(ws, images_to_show)
