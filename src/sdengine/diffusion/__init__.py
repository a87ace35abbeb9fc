"""Diffusion maths: schedules (pure), denoiser wrappers, samplers (pure functions), one sampling entry."""
