# %% [markdown]
# # 03 · Training images
# Put 20+ images into `train_data/` (subfolders are fine; a folder named `10_mychar` is repeated 10 times per
# epoch, as in sd-scripts). Sources: `upload` a zip from this computer; a `zip` on Drive
# (`/content/drive/MyDrive/...`) or at a URL (a Google Drive share link works); a `folder` on Drive; `urls` (a text
# file with one image URL per line, or the URLs themselves); a `hub` dataset (`owner/name`); or `booru`: a tag
# search (e.g. `hatsune_miku solo`) on Danbooru, Gelbooru or Safebooru, each image with its tags as the caption
# (Danbooru allows 2 tags without an account). Only images and `.txt`/`.caption` files are taken.
#
# Then the dataset doctor checks every image: unreadable or truncated files, missing captions, near-duplicates,
# and how the images fall into buckets.

# %% [setup]

# %% [parameters]
#@title Get the images { display-mode: "form" }
source = "upload"  #@param ["upload", "zip", "folder", "urls", "hub", "booru"]
#@markdown The zip/folder path or URL, the URL list, the dataset name, or the booru tags.
location = ""  #@param {type:"string"}
subfolder = ""  #@param {type:"string"}
#@markdown For `booru`: at most `limit` images; `ratings` e.g. `g,s` (empty = all); posts below `min_score` skipped.
booru_site = "danbooru"  #@param ["danbooru", "gelbooru", "safebooru"]
limit = 100  #@param {type:"integer"}
ratings = ""  #@param {type:"string"}
min_score = 0  #@param {type:"integer"}

# %%
from lycolab.steps import data
added = data.get_data(ws, source, location, subfolder, limit=limit, booru_site=booru_site, ratings=ratings, min_score=min_score)

# %%
added

# %% [parameters]
#@title Dataset doctor { display-mode: "form" }
resolution = 512  #@param [512, 768, 1024] {type:"raw"}

# %%
report = data.dataset_report(ws, resolution)

# %%
report

# %% [parameters]
#@title Near-duplicates { display-mode: "form" }
#@markdown Lists groups of near-identical images; tick to keep the best of each (most pixels) and move the others,
#@markdown with their captions, to the project's `duplicates/` folder (nothing is deleted).
move_duplicates = False  #@param {type:"boolean"}

# %%
data.move_duplicates_aside(ws, move_duplicates)
