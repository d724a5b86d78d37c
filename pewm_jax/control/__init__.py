"""The closed loop: the primitive policy (models + transforms) and the controller."""
