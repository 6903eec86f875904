from .clip_grad import dispatch_clip_grad as dispatch_clip_grad
