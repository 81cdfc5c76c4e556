# %% [markdown]
# # 06 · Train
# Trains with the files step 05 wrote. The loss plot updates in place and each round of samples appears as a grid;
# adapter files go to `output/` after every saved epoch. Check the bucket resolutions and image counts in the log.
#
# Quick overrides apply to this run only (empty = step 05's value). After a disconnect, tick `resume`: training
# continues from the newest saved state (step 05's `save_state`) and ends exactly where an unbroken run would.

# %% [parameters]
#@title Workspace { display-mode: "form" }
project = "my_lora"  #@param {type:"string"}
workspace_root = ""  #@param {type:"string"}

# %%
from lycolab.colab import open_workspace
ws = open_workspace(project, workspace_root)

# %% [parameters]
#@title Run { display-mode: "form" }
unet_lr = ""  #@param {type:"string"}
text_encoder_lr = ""  #@param {type:"string"}
num_epochs = ""  #@param {type:"string"}
resume = False  #@param {type:"boolean"}

# %%
from lycolab.steps import train
result = train.run(ws, unet_lr, text_encoder_lr, num_epochs, resume)

# %%
train.summary(result)
