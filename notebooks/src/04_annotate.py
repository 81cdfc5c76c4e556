# %% [markdown]
# # 04 · Captions
# Writes a caption file beside every image: **WD1.4 tags** for anime and manga images, **BLIP** sentences for
# general images, or `none` to only clean the captions you already have.
#
# Remove the character's own features (e.g. `long hair, red eyes`) with `undesired_tags` so the model learns them
# as part of the character; the `trigger_word` goes first in every caption. Re-running with other undesired tags
# or another trigger word updates every caption already there (the old trigger word is replaced).
#
# `skip` keeps existing captions; `overwrite` re-tags the ones lycolab wrote but keeps those you edited (in the
# editor below, with the tag tools, or by hand); `overwrite_all` replaces every caption; `append` adds only tags a
# caption lacks. Taggers: WD1.4 v2 and v3 (`wd-v3-swinv2` …, better on recent anime art), or a hub repo / folder.

# %% [setup]

# %% [parameters]
#@title Annotate { display-mode: "form" }
method = "wd14"  #@param ["wd14", "blip", "none"]
#@markdown Empty = the default model (WD1.4 ConvNeXtV2 tagger v2, or BLIP large); or a hub repo or local folder.
annotation_model = ""  #@param ["", "wd-v3-swinv2", "wd-v3-convnext", "wd-v3-vit", "wd-v3-vit-large", "wd-v3-eva02-large", "wd-v2-convnextv2", "wd-v2-swinv2", "wd-v2-vit", "wd-v2-moat"] {allow-input: true}
threshold = 0.35  #@param {type:"slider", min:0.05, max:0.95, step:0.05}
character_threshold = 0.85  #@param {type:"slider", min:0.05, max:1.0, step:0.05}
undesired_tags = ""  #@param {type:"string"}
trigger_word = ""  #@param {type:"string"}
caption_extension = ".txt"  #@param [".txt", ".caption"]
mode = "skip"  #@param ["skip", "overwrite", "overwrite_all", "append"]
#@markdown BLIP only: beam search width and caption length in tokens.
blip_num_beams = 1  #@param {type:"integer"}
blip_min_length = 5  #@param {type:"integer"}
blip_max_length = 75  #@param {type:"integer"}

# %%
from lycolab.steps import annotate
annotated = annotate.annotate(ws, method, annotation_model, threshold, character_threshold=character_threshold, undesired_tags=undesired_tags, trigger_word=trigger_word, caption_extension=caption_extension, mode=mode, blip_min_length=blip_min_length, blip_max_length=blip_max_length, blip_num_beams=blip_num_beams)

# %%
annotated

# %% [parameters]
#@title Tag tools { display-mode: "form" }
#@markdown On every caption: `add` tags, `remove` tags (`*hair` wildcards), `replace` (`old=>new, a=>b`);
#@markdown `search` lists the images whose captions hold all the given tags. (The trigger word and undesired tags
#@markdown are the form above.) Changed captions count as your edits: a later `overwrite` keeps them.
add_tags = ""  #@param {type:"string"}
remove_tags = ""  #@param {type:"string"}
replace_tags = ""  #@param {type:"string"}
search_tags = ""  #@param {type:"string"}

# %%
edited = annotate.edit_tags(ws, add=add_tags, remove=remove_tags, replace=replace_tags, search=search_tags)

# %%
edited

# %% [parameters]
#@title Look at the result { display-mode: "form" }
top_tags = 30  #@param {type:"integer"}
images_to_show = 6  #@param {type:"integer"}

# %%
annotate.tag_table(ws, top_tags)

# %%
annotate.caption_browser(ws, images_to_show)
