"""jobcloud VM provisioning: worker VM template, libvirt scaler and admin scripts (issue #4)."""
