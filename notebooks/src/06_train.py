# %% [markdown]
# # 06 · Train
# Trains with the files step 05 wrote. The loss plot updates in place and each round of samples appears as a grid;
# adapter files go to `output/` after every saved epoch. Check the bucket resolutions and image counts in the log.
#
# Quick overrides apply to this run only (empty = step 05's value). After a disconnect just open this notebook
# again and run it: with `resume` (on by default) it finds the newest state of the unfinished run on Drive (step
# 05's `save_state`) and continues, ending exactly where an unbroken run would. This step needs a GPU runtime
# (*Runtime → Change runtime type → T4 GPU*); on a CPU runtime it stops unless the model is the tiny demo or you
# tick `train_on_cpu`.

# %% [setup]

# %% [parameters]
#@title Run { display-mode: "form" }
unet_lr = ""  #@param {type:"string"}
text_encoder_lr = ""  #@param {type:"string"}
num_epochs = ""  #@param {type:"string"}
resume = True  #@param {type:"boolean"}
train_on_cpu = False  #@param {type:"boolean"}
#@markdown TensorBoard of this project's logs, inline.
show_tensorboard = False  #@param {type:"boolean"}

# %%
if show_tensorboard:
    %load_ext tensorboard
    %tensorboard --logdir {ws.logs}

# %%
from lycolab.steps import train
estimate = train.estimate(ws, unet_lr, text_encoder_lr, num_epochs)

# %%
estimate

# %%
result = train.run(ws, unet_lr, text_encoder_lr, num_epochs, resume, train_on_cpu)

# %%
train.summary(result)
