"""Fit a scikit-learn model to a CSV you upload.

Dataset: a .zip holding one .csv file. The last column is the target; the
others are the features (text columns are one-hot encoded). A target with few
distinct values, or text, is a classification; otherwise a regression.
"""
import json
import os
import pickle
from pathlib import Path

import pandas as pd
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.model_selection import train_test_split

DATA = Path(os.environ.get("JOBCLOUD_DATA", "data"))
OUTPUT = Path(os.environ.get("JOBCLOUD_OUTPUT", "."))

csv_files = sorted(DATA.rglob("*.csv"))
if not csv_files:
    raise SystemExit(f"no .csv file in the dataset ({DATA}): upload a .zip holding one")
frame = pd.read_csv(csv_files[0])
print(f"read {csv_files[0].name}: {len(frame)} rows, columns {list(frame.columns)}")

target = frame.columns[-1]
frame = frame.dropna(subset=[target])
X = pd.get_dummies(frame.drop(columns=target)).fillna(0)
y = frame[target]
is_classification = y.dtype == object or y.nunique() <= 20
model = (RandomForestClassifier if is_classification else RandomForestRegressor)(
    n_estimators=100, random_state=0)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
model.fit(X_train, y_train)
score = float(model.score(X_test, y_test))
kind = "classification (accuracy)" if is_classification else "regression (R^2)"
print(f"target {target!r}: {kind} on {len(y_test)} held-out rows = {score:.3f}")

ranked = sorted(zip(X.columns, model.feature_importances_), key=lambda p: -p[1])
for name, weight in ranked[:10]:
    print(f"  {name:30s} {weight:.3f}")

with open(OUTPUT / "model.pkl", "wb") as f:
    pickle.dump(model, f)
pd.DataFrame({"actual": y_test, "predicted": model.predict(X_test)}).to_csv(
    OUTPUT / "predictions.csv", index=False)
with open(OUTPUT / "metrics.json", "w") as f:
    json.dump({"target": target, "task": kind, "score": score, "rows": len(frame)}, f, indent=2)
